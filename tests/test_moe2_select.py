"""MoE² selection (partitioner/moe2): the branch and bound against brute force, its bounds and
dominance rule against enumeration, the mixture's formula, refusals, baselines and the cache."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import numpy as np
import pytest

from partitioner.moe2.experts import Budget, Expert, Problem, SelectionError, energy_j, fits
from partitioner.moe2.objective import GatedObjective, Objective, route
from partitioner.moe2.registry import POLICIES, make_policy
from partitioner.moe2.select import SelectionCache, brute_force, select

# -- random instances ---------------------------------------------------------------------------------------


def rand_experts(rng: random.Random, n: int, n_tok: int, p_offline: float = 0.1) -> tuple[Expert, ...]:
    out = []
    for i in range(n):
        cloud = rng.random() < 0.15
        out.append(
            Expert(
                id=f"x{rng.randrange(1000):03d}-{i}",
                device="cloud" if cloud else f"dev{i}",
                model=rng.choice(["smollm2-135m", "gemma3-270m"]),
                variant=rng.choice(["fp32", "int8", "int4", "pruned-4"]),
                tokenizer=f"t{rng.randrange(n_tok)}",
                kind="cloud" if cloud else "edge",
                latency_ms=rng.uniform(10, 1000),
                energy_j=0.0 if cloud else rng.uniform(0.1, 5),
                quality=rng.uniform(0.7, 1.5),
                online=rng.random() >= p_offline,
            )
        )
    return tuple(out)


def rand_gate(rng: np.random.Generator, losses: np.ndarray, kind: str) -> np.ndarray:
    """(R, E) rows summing to 1: "good" ranks as the losses do, "noisy" sees them through noise,
    "random" not at all; some exact ties and zeros."""
    r, e = losses.shape
    if kind == "good":
        logits = -8 * losses
    elif kind == "noisy":
        logits = -6 * (losses + rng.normal(0, 0.2, (r, e)))
    else:
        logits = rng.normal(0, 2, (r, e))
    if rng.random() < 0.3:
        logits = np.round(logits)  # ties, broken by index
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    if rng.random() < 0.2:
        w[w < np.median(w)] = 0.0  # zero weights
    return w / w.sum(axis=1, keepdims=True)


def rand_problem(rng: random.Random, n: int, r: int = 8) -> Problem:
    nrng = np.random.default_rng(rng.randrange(2**32))
    experts = rand_experts(rng, n, rng.choice([1, 1, 2, 3]))
    q = np.array([e.quality for e in experts])
    losses = np.clip(q[None, :] + nrng.normal(0, 0.2, (r, n)), 0.01, None)
    gate = rand_gate(nrng, losses, rng.choice(["good", "noisy", "random"]))
    n_bytes = nrng.uniform(1, 50, r) if rng.random() < 0.5 else None
    mix = rng.choice(["probability", "mean_loss"])
    return Problem(experts, GatedObjective(gate, losses, tuple(e.tokenizer for e in experts), n_bytes, mix))


def rand_budget(rng: random.Random, experts: Sequence[Expert]) -> Budget:
    """From loose to infeasible: limits drawn around the experts' own costs."""
    lat = sorted(e.latency_ms for e in experts)
    energy = sorted(e.energy_j for e in experts if e.energy_j > 0) or [1.0]
    return Budget(
        energy_j=rng.choice([None, rng.uniform(0.5, 1.5) * rng.choice(energy) * rng.choice([0.5, 1, 2, 3])]),
        latency_ms=rng.choice([None, rng.uniform(0.8, 1.2) * rng.choice(lat)]),
        k=rng.choice([1, 2, 3]),
    )


class PairObjective(Objective):
    """A non-monotone set function with integer terms (exact arithmetic, many ties): a sum of
    per-expert terms and pairwise interactions of either sign, and a valid bound."""

    def __init__(self, rng: random.Random, n: int) -> None:
        self.c = [rng.randint(-5, 5) for _ in range(n)]
        self.q = {(i, j): rng.randint(-3, 3) for i in range(n) for j in range(i + 1, n)}

    @property
    def n_experts(self) -> int:
        return len(self.c)

    def value(self, subset: Sequence[int], k: int) -> float:
        s = sorted(subset)
        return float(sum(self.c[i] for i in s) + sum(self.q[p] for p in itertools.combinations(s, 2)))

    def lower_bound(self, fixed: Sequence[int], allowed: Sequence[int], k: int) -> float:
        base = self.value(fixed, k) if fixed else 0.0
        solo = sum(min(0, self.c[x] + sum(self.q[tuple(sorted((f, x)))] for f in fixed)) for x in allowed)
        pairs = sum(min(0, self.q[tuple(sorted(p))]) for p in itertools.combinations(allowed, 2))
        return base + solo + pairs


def same(a, b) -> None:
    assert (a.subset, a.objective, a.latency_ms, a.energy_j) == (b.subset, b.objective, b.latency_ms, b.energy_j)


def both(problem: Problem, budget: Budget):
    """(select's, brute force's) result, or their errors' bindings."""
    out = []
    for solve in (select, brute_force):
        try:
            out.append(solve(problem, budget))
        except SelectionError as exc:
            out.append(exc.binding)
    return out


# -- exact --------------------------------------------------------------------------------------------------


def test_select_equals_brute_force_on_random_instances() -> None:
    """604 seeded instances, 1 to 16 experts, k in {1, 2, 3}, budgets from loose to infeasible; a
    quarter with a non-monotone pairwise objective: exactness does not rest on monotonicity."""
    rng = random.Random(17)
    sizes = [rng.randint(1, 8) for _ in range(570)] + [rng.randint(9, 12) for _ in range(30)] + [14, 15, 16, 16]
    counts = {"equal": 0, "refused": 0}
    for t, n in enumerate(sizes):
        problem = rand_problem(rng, n, r=rng.choice([4, 8]) if n <= 12 else 3)
        if t % 4 == 3:
            problem = Problem(problem.experts, PairObjective(rng, n))
        budget = rand_budget(rng, problem.experts)
        got, ref = both(problem, budget)
        if isinstance(ref, str):
            assert got == ref, (t, got, ref)
            counts["refused"] += 1
            continue
        same(got, ref)
        assert got.evaluated <= ref.evaluated
        assert fits(problem.experts, [problem.index(i) for i in got.subset], budget)
        assert all(problem.experts[problem.index(i)].online for i in got.subset)
        counts["equal"] += 1
    assert counts["equal"] >= 450 and counts["refused"] >= 10, counts


def test_bound_and_inert_hold_against_enumeration() -> None:
    """At random nodes (fixed, allowed): lower_bound <= every completion's value, and each expert
    `inert` names leaves, in every completion holding it, an expert whose removal changes nothing."""
    rng = random.Random(3)
    for _ in range(150):
        problem = rand_problem(rng, rng.randint(2, 7), r=6)
        obj, n, k = problem.objective, len(problem.experts), rng.choice([1, 2, 3])
        idx = list(range(n))
        rng.shuffle(idx)
        cut = rng.randint(0, n - 1)
        fixed, allowed = idx[:cut], idx[cut : cut + rng.randint(1, n - cut)]
        if any(obj.inert([f for f in fixed if f != g], [g], k) for g in fixed):
            continue  # inert expects fixed free of unused experts, as the search keeps it
        completions = [fixed + list(x) for m in range(len(allowed) + 1) for x in itertools.combinations(allowed, m)]
        completions = [c for c in completions if c]
        bound = obj.lower_bound(fixed, allowed, k)
        assert all(bound <= obj.value(c, k) for c in completions)
        for x in obj.inert(fixed, allowed, k):
            for c in completions:
                if x in c:
                    v = obj.value(c, k)
                    assert any(len(c) > 1 and obj.value([y for y in c if y != d], k) == v for d in c), (c, x)


def test_gated_objective_is_monotone_for_a_good_gate_at_k1() -> None:
    """A gate that ranks experts as their losses do: adding an expert never raises the k = 1 objective.
    A gate whose top choice is worse than a runner-up breaks it; the solver stays exact."""
    rng = random.Random(5)
    for _ in range(30):
        p = rand_problem(rng, 6, r=10)
        losses = p.objective.losses
        good = GatedObjective(rand_gate(np.random.default_rng(1), losses, "good"), losses, p.objective.tokenizers)
        for m in range(1, 6):
            for s in itertools.combinations(range(6), m):
                for e in set(range(6)) - set(s):
                    assert good.value((*s, e), 1) <= good.value(s, 1)
    losses = np.array([[1.0, 2.0]])
    bad = GatedObjective(np.array([[0.3, 0.7]]), losses, ("t", "t"))  # the gate prefers the worse expert
    assert bad.value((0, 1), 1) > bad.value((0,), 1)
    experts = tuple(Expert(f"e{i}", "d", "m", "v", "t", "edge", 10.0, 1.0, 1.0) for i in range(2))
    same(select(Problem(experts, bad), Budget()), brute_force(Problem(experts, bad), Budget()))
    assert select(Problem(experts, bad), Budget()).subset == ("e0",)


def test_mixture_loss_exact_and_mean_approximation() -> None:
    """k = 2 by hand: -log2(sum w 2^(-L B)) / B (exact) and sum w L (approximation, never below it);
    equal at k = 1; `route` names the same mixture."""
    w = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    losses = np.array([[1.0, 0.5, 2.0], [0.8, 1.2, 0.4]])
    b = np.array([10.0, 3.0])
    toks = ("a", "a", "b")
    exact = GatedObjective(w, losses, toks, b, "probability")
    approx = GatedObjective(w, losses, toks, b, "mean_loss")
    # request 0: top 0 (a), partner 1 (a): weights 0.5/0.8, 0.3/0.8; request 1: top 1 (a), partner 0
    mix = [((0, 0.5 / 0.8), (1, 0.3 / 0.8)), ((1, 0.6 / 0.7), (0, 0.1 / 0.7))]
    want_exact = [-math.log2(sum(wc * 2 ** (-losses[r, c] * b[r]) for c, wc in m)) / b[r] for r, m in enumerate(mix)]
    want_mean = [sum(wc * losses[r, c] for c, wc in m) for r, m in enumerate(mix)]
    np.testing.assert_allclose(exact.request_losses((0, 1, 2), 2), want_exact, rtol=1e-12)
    np.testing.assert_allclose(approx.request_losses((0, 1, 2), 2), want_mean, rtol=1e-12)
    assert all(a >= e for a, e in zip(want_mean, want_exact, strict=True))
    for r, m in enumerate(mix):
        picked, weights = route(w[r], toks, (0, 1, 2), 2)
        assert picked == tuple(c for c, _ in m)
        np.testing.assert_allclose(weights, [wc for _, wc in m])
    assert exact.value((0, 1, 2), 1) == approx.value((0, 1, 2), 1) == pytest.approx((1.0 + 1.2) / 2)
    assert route(w[0], ("a", "b", "b"), (0, 1, 2), 3) == ((0,), (1.0,))  # other tokenizers never mix


def test_energy_is_a_requests_worst_case() -> None:
    """energy(S) bounds what any gate row spends on its mixture, and some row spends exactly that."""
    rng = random.Random(11)
    for _ in range(50):
        experts = rand_experts(rng, 6, 2, 0.0)
        toks = [e.tokenizer for e in experts]
        s, k = rng.sample(range(6), rng.randint(1, 6)), rng.choice([1, 2, 3])
        spent = set()
        for _ in range(200):
            row = np.random.default_rng(rng.randrange(1000)).dirichlet(np.ones(6))
            spent.add(sum(experts[i].energy_j for i in route(row, toks, s, k)[0]))
        hungry = sorted(s, key=lambda i: -experts[i].energy_j)
        for g in set(toks):  # the hungriest of one tokenizer, ranked first by a constructed row
            row = np.zeros(6)
            for pos, i in enumerate(i for i in hungry if toks[i] == g):
                row[i] = 10.0 - pos
            if row.any():
                spent.add(sum(experts[i].energy_j for i in route(row / row.sum(), toks, s, k)[0]))
        assert max(spent) == pytest.approx(energy_j(experts, s, k))


# -- refusals -------------------------------------------------------------------------------------------------


def fleet(energies: Sequence[float], latencies: Sequence[float], online: bool = True) -> Problem:
    experts = tuple(
        Expert(f"e{i}", f"d{i}", "m", "int4", "t", "edge", lat, en, 1.0, online)
        for i, (en, lat) in enumerate(zip(energies, latencies, strict=True))
    )
    n = len(experts)
    return Problem(experts, GatedObjective(np.full((2, n), 1 / n), np.ones((2, n)), ("t",) * n))


def test_infeasible_budget_names_the_binding_constraint() -> None:
    p = fleet([2.1, 3.0], [100, 50])
    with pytest.raises(
        SelectionError, match=r"energy_j — the cheapest online expert \(e0\) needs 2\.1 J, the budget is 1\.5 J"
    ) as e:
        select(p, Budget(energy_j=1.5))  # fmt: skip
    assert e.value.binding == "energy_j"
    with pytest.raises(SelectionError, match="latency_ms") as e:
        select(p, Budget(energy_j=5, latency_ms=20))
    assert e.value.binding == "latency_ms"
    with pytest.raises(SelectionError) as e:  # each meets one budget, none both: the closest's worst
        select(p, Budget(energy_j=2.5, latency_ms=80))
    assert e.value.binding == "energy_j" and "e1" in str(e.value)
    with pytest.raises(SelectionError, match="no expert is online") as e:
        select(fleet([1.0], [10], online=False), Budget())
    assert e.value.binding == "availability"


@pytest.mark.parametrize("bad", [{"energy_j": 0}, {"energy_j": -1.0}, {"latency_ms": 0.0}, {"latency_ms": -5},
                                 {"latency_ms": math.nan}, {"k": 0}])  # fmt: skip
def test_bad_budgets_raise_value_error(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Budget(**bad)


def test_offline_experts_are_never_chosen() -> None:
    p = fleet([1.0, 1.0, 1.0], [10, 10, 10])
    p = Problem(p.experts, GatedObjective(np.array([[0.8, 0.1, 0.1]]), np.array([[0.1, 1.0, 2.0]]), ("t",) * 3))
    assert select(p, Budget()).subset == ("e0",)
    off = p.with_expert(Expert("e0", "d0", "m", "int4", "t", "edge", 10, 1.0, 1.0, online=False))
    assert off.version == p.version + 1
    assert select(off, Budget()).subset == ("e1",) == brute_force(off, Budget()).subset


# -- baselines and the cache ------------------------------------------------------------------------------


def test_baselines_are_feasible_and_never_beat_the_solver() -> None:
    rng = random.Random(23)
    seen = dict.fromkeys(POLICIES, 0)
    for _ in range(60):
        problem = rand_problem(rng, rng.randint(1, 9), r=8)
        budget = rand_budget(rng, problem.experts)
        try:
            best = select(problem, budget)
        except SelectionError as exc:
            for name in POLICIES:
                if name in ("edge_only", "cloud_only"):
                    continue  # a restricted fleet may fail for its own reason
                with pytest.raises(SelectionError) as e:
                    make_policy(name).choose(problem, budget)
                assert e.value.binding == exc.binding
            continue
        for name in POLICIES:
            try:
                got = make_policy(name).choose(problem, budget)
            except SelectionError:
                assert name in ("edge_only", "cloud_only")
                continue
            subset = [problem.index(i) for i in got.subset]
            assert fits(problem.experts, subset, budget if got.threshold is None else Budget(*budget.limits().values()))
            assert all(problem.experts[i].online for i in subset)
            assert got.objective >= best.objective, (name, got, best)
            seen[name] += 1
    assert min(seen.values()) >= 10, seen
    p = fleet([1.0, 2.0], [10, 20])
    same(make_policy("moe2").choose(p, Budget()), select(p, Budget()))
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope")


def test_cache_hits_and_a_fleet_change_invalidates() -> None:
    calls = []
    p = fleet([1.0, 2.0], [10, 20])

    def solve(problem: Problem, budget: Budget):
        calls.append(budget)
        return select(problem, budget)

    cache = SelectionCache(solve)
    first = cache.get(p, Budget(energy_j=3))
    assert cache.get(p, Budget(energy_j=3)) == first and len(calls) == 1
    cache.get(p, Budget(energy_j=3, k=2))  # k is part of the key
    assert len(calls) == 2
    with pytest.raises(SelectionError):
        cache.get(p, Budget(energy_j=0.5))
    with pytest.raises(SelectionError):
        cache.get(p, Budget(energy_j=0.5))  # refusals are cached too
    assert len(calls) == 3 and cache.hits == 2
    slower = p.with_expert(Expert("e0", "d0", "m", "int4", "t", "edge", 10, 5.0, 1.0))  # new cost, new version
    assert cache.get(slower, Budget(energy_j=3)).subset == ("e1",) and len(calls) == 4
    quiet = Problem(tuple(slower.experts), slower.objective, slower.version)  # a new, equal tuple
    cache.get(quiet, Budget(energy_j=3))  # equal experts, same version and objective: still cached
    assert len(calls) == 4
