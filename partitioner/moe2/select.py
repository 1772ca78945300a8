"""MoE² selection: the subset of online experts that minimises the objective within a budget, exactly.

`select` is branch and bound over the experts, best quality first. A node holds the experts chosen
so far (`fixed`, feasible) and those that may still join (`allowed`: later in the order, each fitting
with `fixed`). Each child adds one allowed expert j and leaves out those before it, so every subset
is met at most once. Before branching, a greedy pass (add the expert that lowers the objective most,
while one does) sets the incumbent, so the bound prunes from the first node; every subset's value is
computed once (`Selection.evaluated` counts distinct subsets). Prunings:

- constraints: latency and energy are monotone nondecreasing in S (experts.py), so an expert that
  does not fit with a node's `fixed` fits with none of its supersets and leaves `allowed` for good;
- objective: `Objective.lower_bound(fixed, allowed)` bounds every completion from below; a node whose
  bound exceeds the incumbent is cut, or equals it while `fixed` alone is larger (ties prefer fewer).
  `Objective.tail_bounds` bounds a node's children from each position on (all of them at once, at
  k = 1), so the loop over the children stops at the first position whose bound is beaten;
- inert: `Objective.inert(fixed, allowed)` names the experts that would add one no request uses
  (the same subset without it is as good and smaller): they leave `allowed` (`Objective.prune`
  does both at once);
- twins: experts the objective cannot tell apart (`Objective.twins`; in the hub, one variant served
  on several devices: the same gate and loss columns). x is dominated by a twin a with a smaller id
  (and, where energy binds at k > 1, no more energy): a subset holding x but not a loses the tie to
  the one with a in x's place (as feasible, the same value and size, smaller ids), so x joins no
  completion that leaves a out. On the benchmark's fleet this shrinks 64 experts to their variants.

Monotonicity of the objective. With a gate that ranks experts as their losses do, adding an expert
never raises the k = 1 objective (each request moves to a better expert), and MoE² solves the monotone
problem. It fails when the gate's top choice is worse than a runner-up: adding that expert moves
requests to it and raises their loss. The solver does not rely on it: it searches exactly, and
GatedObjective's bound (the least loss among the experts still eligible per request) is valid for
any gate. Monotonicity only makes the bound tight (it then equals the objective of fixed ∪ allowed
at k = 1), so the search is fast for good gates and slower, never wrong, for bad ones.

Ties: equal objectives prefer fewer experts, then the lexicographically smaller sorted ids, in both
`select` and `brute_force`, so the two agree exactly. Offline experts are never chosen.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from partitioner.moe2.experts import Budget, Problem, SelectionError, energy_j, fits, latency_ms, refuse
from partitioner.moe2.objective import route


@dataclass(frozen=True)
class Selection:
    """The experts a budget's requests may be routed to, and what they cost."""

    subset: tuple[str, ...]
    """The selected experts' ids, sorted."""
    objective: float
    """The objective of the subset (GatedObjective: mean calibration loss, bits per byte)."""
    latency_ms: float
    """The subset's worst-case latency per request (its slowest expert)."""
    energy_j: float
    """The subset's worst-case edge energy per request (experts.energy_j)."""
    evaluated: int
    """How many subsets' objectives were computed to find it."""
    threshold: float | None = None
    """The threshold router's cloud threshold (baselines.Threshold); None when the gate's top-k routes."""


Key = tuple[float, int, tuple[str, ...]]


def _key(problem: Problem, subset: Sequence[int], value: float) -> Key:
    """The order between subsets: objective, then size, then sorted ids."""
    return value, len(subset), tuple(sorted(problem.experts[i].id for i in subset))


def selection(problem: Problem, subset: Sequence[int], k: int, evaluated: int, value: float | None = None) -> Selection:
    """`subset` (indices) as a Selection; its objective is computed unless given."""
    value = problem.objective.value(subset, k) if value is None else value
    return Selection(
        subset=tuple(sorted(problem.experts[i].id for i in subset)),
        objective=value,
        latency_ms=latency_ms(problem.experts, subset),
        energy_j=energy_j(problem.experts, subset, k),
        evaluated=evaluated,
    )


def candidates(problem: Problem, budget: Budget) -> list[int]:
    """The online experts that meet `budget` alone, best quality first (ties: id). Raises
    SelectionError naming the binding constraint when there are none (then no subset fits)."""
    es = problem.experts
    out = [i for i, e in enumerate(es) if e.online and fits(es, (i,), budget)]
    if not out:
        raise refuse(es, budget)
    return sorted(out, key=lambda i: (es[i].quality, es[i].id))


class _Energy:
    """Incremental energy check: per tokenizer, the k largest energies of `fixed`, descending."""

    def __init__(self, problem: Problem, budget: Budget) -> None:
        self.experts, self.k, self.limit = problem.experts, budget.k, budget.energy_j

    def add(self, tops: dict[str, tuple[float, ...]], j: int) -> dict[str, tuple[float, ...]]:
        e = self.experts[j]
        out = dict(tops)
        out[e.tokenizer] = tuple(sorted((*tops.get(e.tokenizer, ()), e.energy_j), reverse=True)[: self.k])
        return out

    def fits(self, tops: dict[str, tuple[float, ...]], j: int) -> bool:
        """Whether expert j joins without breaking the budget (the others' groups already fit)."""
        if self.limit is None or self.k == 1:  # k = 1: energy is the hungriest, checked per expert
            return True
        e = self.experts[j]
        return sum(sorted((*tops.get(e.tokenizer, ()), e.energy_j), reverse=True)[: self.k]) <= self.limit


def _dominators(problem: Problem, budget: Budget, order: Sequence[int]) -> dict[int, int]:
    """Per candidate x, the bitmask of candidates a that dominate it: twins (Objective.twins) with a
    smaller id, the same tokenizer and (where energy binds, k > 1) no more energy. A feasible subset
    holding x but not a loses to the one with a in x's place: as feasible (latency is the slowest
    expert, each candidate fits alone; a's group spends no more energy), the same value (twins), the
    same size and smaller ids. So no optimum holds x without a."""
    es, ok = problem.experts, set(order)
    energy_binds = budget.k > 1 and budget.energy_j is not None
    out = dict.fromkeys(order, 0)
    for group in problem.objective.twins():
        members = [i for i in group if i in ok]
        for x, a in itertools.permutations(members, 2):
            cheaper = not energy_binds or es[a].energy_j <= es[x].energy_j
            if cheaper and es[a].id < es[x].id and es[a].tokenizer == es[x].tokenizer:
                out[x] |= 1 << a
    return out


def _bits(indices: Sequence[int]) -> int:
    """The bitmask of `indices`."""
    out = 0
    for i in indices:
        out |= 1 << i
    return out


class _Search:
    """One `select` call's branch and bound (module docstring). Sets of experts are bitmasks where a
    set is only tested; lists (in the order they were added) where the objective reads them."""

    def __init__(self, problem: Problem, budget: Budget, order: list[int]) -> None:
        self.problem, self.obj, self.k = problem, problem.objective, budget.k
        self.order = order
        self.energy = _Energy(problem, budget)
        self.dominators = _dominators(problem, budget, order)
        self.values: dict[int, float] = {}  # subset bitmask -> objective: each subset is evaluated once
        self.best: tuple[Key, tuple[int, ...]] | None = None

    def evaluate(self, subset: list[int], bits: int) -> float:
        """The objective of `subset`, which becomes the incumbent if it is better."""
        value = self.values.get(bits)
        if value is None:
            value = self.values[bits] = self.obj.value(subset, self.k)
        best = self.best
        if best is None or value <= best[0][0]:  # ids are only sorted for a possible winner
            key = _key(self.problem, subset, value)
            if best is None or key < best[0]:
                self.best = key, tuple(subset)
        return value

    def beaten(self, bound: float, size: int) -> bool:
        """Whether no completion of a node with `size` fixed experts and lower bound `bound` can beat
        the incumbent: all are worse, or tie at best and are larger (each holds the fixed ones)."""
        if self.best is None:
            return False
        value, best_size, _ = self.best[0]
        return bound > value or (bound == value and size > best_size)

    def seed(self) -> None:
        """A first incumbent, so that the bound prunes from the first node: greedy forward from the best
        single expert, adding the one that lowers the objective most while one does (its subsets are
        evaluated once: the search reuses their values)."""
        subset: list[int] = []
        tops: dict[str, tuple[float, ...]] = {}
        bits, current = 0, math.inf
        while True:
            step: tuple[float, int] | None = None
            for x in self.order:
                if bits >> x & 1 or self.dominators[x] & ~bits or not self.energy.fits(tops, x):
                    continue
                value = self.evaluate([*subset, x], bits | 1 << x)
                if step is None or value < step[0]:
                    step = value, x
            if step is None or step[0] >= current:
                return
            current, x = step
            subset.append(x)
            bits, tops = bits | 1 << x, self.energy.add(tops, x)

    def branch(self, fixed: list[int], bits: int, tops: dict[str, tuple[float, ...]], allowed: list[int]) -> None:
        """Visit every child of the node (fixed, allowed): fixed + [j] for each allowed j, with those
        before j left out (so every subset is met at most once)."""
        keep = bits | _bits(allowed)  # what completions may hold; shrinks as children leave experts out
        tails = self.obj.tail_bounds(fixed, allowed, self.k)
        for pos, j in enumerate(allowed):
            if tails is not None and self.beaten(tails[pos], len(fixed) + 1):
                return  # no child from here on can win: each holds fixed and one of allowed[pos:]
            dominated = self.dominators[j] & ~keep  # a dominator of j left out of every completion here
            keep &= ~(1 << j)  # the later children leave j out
            if dominated:
                continue
            child, child_bits = [*fixed, j], bits | 1 << j
            child_tops = self.energy.add(tops, j)
            rest = [x for x in allowed[pos + 1 :] if self.energy.fits(child_tops, x)]
            rest_bits = _bits(rest)
            rest = [x for x in rest if not self.dominators[x] & ~(child_bits | rest_bits)]
            if rest:
                cutoff = math.inf if self.best is None else self.best[0][0]
                dead, bound = self.obj.prune(child, rest, self.k, cutoff)
                if self.beaten(bound, len(child)):
                    continue
                if dead:
                    gone = set(dead)
                    rest = [x for x in rest if x not in gone]
            self.evaluate(child, child_bits)
            if rest:
                self.branch(child, child_bits, child_tops, rest)


def select(problem: Problem, budget: Budget) -> Selection:
    """The exact optimum of `problem.objective` over the non-empty subsets of online experts within
    `budget` (module docstring). Raises SelectionError naming the binding constraint when no subset
    fits (ValueError for a bad budget is raised by Budget itself)."""
    search = _Search(problem, budget, candidates(problem, budget))
    search.seed()
    search.branch([], 0, {}, search.order)
    assert search.best is not None  # every candidate alone is feasible
    (value, _, _), subset = search.best
    return selection(problem, subset, budget.k, len(search.values), value)


def brute_force(problem: Problem, budget: Budget) -> Selection:
    """The same optimum as `select`, by enumerating every non-empty subset of the online experts (for
    tests and the benchmark). Raises SelectionError as `select` does."""
    es = problem.experts
    online = [i for i, e in enumerate(es) if e.online]
    best: tuple[Key, tuple[int, ...]] | None = None
    evaluated = 0
    for size in range(1, len(online) + 1):
        for subset in itertools.combinations(online, size):
            if not fits(es, subset, budget):
                continue
            evaluated += 1
            key = _key(problem, subset, problem.objective.value(subset, budget.k))
            if best is None or key < best[0]:
                best = key, subset
    if best is None:
        raise refuse(es, budget)
    return selection(problem, best[1], budget.k, evaluated, best[0][0])


def route_ids(problem: Problem, weights: Sequence[float], chosen: Selection, k: int) -> tuple[
    tuple[str, ...], tuple[float, ...]
]:  # fmt: skip
    """One request's experts (ids, top first) and renormalised weights within a selection: the gate's
    top-k in it (objective.route). `weights` (E,) is the gate's output over all experts."""
    subset = [problem.index(i) for i in chosen.subset]
    picked, mixed = route(weights, [e.tokenizer for e in problem.experts], subset, k)
    return tuple(problem.experts[i].id for i in picked), mixed


# -- the cache ---------------------------------------------------------------------------------------------


class SelectionCache:
    """Selections (and refusals) by budget for one fleet. A problem with another version, other experts
    (costs, online status) or another objective empties it first, so a fleet change is never served
    from the cache. Keyed by (version, budget); the budget holds k."""

    def __init__(self, solve: Callable[[Problem, Budget], Selection] = select, maxsize: int = 4096) -> None:
        self.solve = solve
        """The solver behind the cache (select, or a policy's choose)."""
        self.maxsize = maxsize
        """Entries kept; the oldest go first."""
        self.hits = 0
        """Lookups answered from the cache."""
        self.misses = 0
        """Lookups that ran the solver."""
        self._fleet: tuple | None = None  # (version, experts, objective) the entries belong to
        self._entries: dict[tuple[int, Budget], Selection | SelectionError] = {}

    def get(self, problem: Problem, budget: Budget) -> Selection:
        """The selection for `budget`; raises SelectionError as the solver does (cached too)."""
        fleet = self._fleet
        if (
            fleet is None
            or fleet[0] != problem.version
            or fleet[2] is not problem.objective
            or fleet[1] != problem.experts
        ):
            self._entries.clear()
            self._fleet = (problem.version, problem.experts, problem.objective)
        key = (problem.version, budget)
        hit = self._entries.get(key)
        if hit is None:
            self.misses += 1
            try:
                hit = self.solve(problem, budget)
            except SelectionError as exc:
                hit = exc
            if len(self._entries) >= self.maxsize:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = hit
        else:
            self.hits += 1
        if isinstance(hit, SelectionError):
            raise SelectionError(str(hit), hit.binding)
        return hit
