"""MoE² selection's fast paths against their references: twins (one variant served on several devices)
and the dominance rule they allow, the fused k = 1 prune against inert + lower_bound, and the
benchmark's 64-expert fleet (issue 17's size) against the answers of the slower exact search."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Sequence

import numpy as np
import pytest

from benchmarks.moe2_select import BUDGETS
from benchmarks.moe2_select import fleet as bench_fleet
from partitioner.moe2.experts import Budget, Expert, Problem
from partitioner.moe2.objective import GatedObjective, Objective
from partitioner.moe2.select import select
from tests.test_moe2_select import both, rand_budget, rand_experts, rand_gate, rand_problem, same


def twin_problem(rng: random.Random, n: int, r: int) -> Problem:
    """n experts over fewer variants, as the hub builds them: each expert takes its variant's gate and
    loss columns (one column per variant, renormalised over the experts), so experts of one variant
    are twins unless another variant's weight ties theirs (rounded gates). Ids, costs, quality and
    online state are per expert, so neither the id order nor the quality order follows the index."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    m = rng.randint(1, max(1, n - 1))
    toks = [f"t{rng.randrange(rng.choice([1, 2, 3]))}" for _ in range(m)]
    variant = [rng.randrange(m) for _ in range(n)]
    drawn = rand_experts(rng, n, 1)
    experts = tuple(dataclasses.replace(e, tokenizer=toks[v]) for e, v in zip(drawn, variant, strict=True))
    base = np.clip(nrng.uniform(0.7, 1.5, m)[None, :] + nrng.normal(0, 0.2, (r, m)), 0.01, None)
    gate = rand_gate(nrng, base, rng.choice(["good", "noisy", "random"]))  # (r, m)
    if m > 1 and rng.random() < 0.3:  # two variants the gate cannot tell apart: weight ties, other losses
        i, j = rng.sample(range(m), 2)
        gate[:, j] = gate[:, i]
    gate = gate[:, variant]  # (r, n)
    gate[gate.sum(axis=1) == 0] = 1.0  # rows whose only weights fell on variants no expert serves
    losses = base[:, variant]
    if rng.random() < 0.2:  # one expert's losses moved a little: no longer its variant's twin
        losses[:, rng.randrange(n)] += 1e-9
    n_bytes = nrng.uniform(1, 50, r) if rng.random() < 0.5 else None
    mix = rng.choice(["probability", "mean_loss"])
    obj = GatedObjective(gate / gate.sum(axis=1, keepdims=True), losses, tuple(toks[v] for v in variant), n_bytes, mix)
    return Problem(experts, obj)


def pair_budget(rng: random.Random, experts: Sequence[Expert]) -> Budget:
    """k > 1 and an energy limit near two experts' sum: which twin may stand in for which turns on
    their energies."""
    i, j = rng.sample(range(len(experts)), 2)
    energy = max(0.05, (experts[i].energy_j + experts[j].energy_j) * rng.uniform(0.8, 1.2))
    return Budget(energy_j=energy, latency_ms=None, k=rng.choice([2, 3]))


def test_select_equals_brute_force_with_twins() -> None:
    """400 seeded fleets of 2 to 11 experts over fewer variants, k in {1, 2, 3}; half the budgets from
    loose to infeasible, half with energy binding at k > 1 (pair_budget)."""
    rng = random.Random(29)
    counts = {"equal": 0, "refused": 0, "with twins": 0}
    for t in range(400):
        n = rng.randint(2, 8) if t < 360 else rng.randint(9, 11)
        problem = twin_problem(rng, n, r=rng.choice([3, 6]))
        budget = (rand_budget if t % 2 else pair_budget)(rng, problem.experts)
        got, ref = both(problem, budget)
        counts["with twins"] += bool(problem.objective.twins())
        if isinstance(ref, str):
            assert got == ref, (t, got, ref)
            counts["refused"] += 1
            continue
        same(got, ref)
        assert got.evaluated <= ref.evaluated
        counts["equal"] += 1
    assert counts["equal"] >= 300 and counts["refused"] >= 10 and counts["with twins"] >= 250, counts


def test_twins_are_interchangeable() -> None:
    """Swapping a subset's twin for another member of its group leaves the value bitwise equal at
    every k; a weight tie with an outsider, or a loss that differs, keeps experts out of a group."""
    rng = random.Random(31)
    checked = 0
    for _ in range(60):
        problem = twin_problem(rng, rng.randint(3, 8), r=5)
        obj, n = problem.objective, len(problem.experts)
        for group in obj.twins():
            for a, b in itertools.permutations(group, 2):
                others = [i for i in range(n) if i not in (a, b)]
                for size in range(len(others) + 1):
                    for rest in itertools.islice(itertools.combinations(others, size), 3):
                        for k in (1, 2, 3):
                            assert obj.value([*rest, a], k) == obj.value([*rest, b], k)
                            checked += 1
    assert checked >= 1000, checked
    w = np.array([[0.3, 0.3, 0.3, 0.1], [0.4, 0.4, 0.1, 0.1]])
    losses = np.array([[1.0, 1.0, 2.0, 1.0], [1.5, 1.5, 0.5, 1.5]])
    assert GatedObjective(w, losses, ("t",) * 4).twins() == ()  # expert 2 ties the pair on request 0
    w[0] = [0.35, 0.35, 0.2, 0.1]
    assert GatedObjective(w, losses, ("t",) * 4).twins() == ((0, 1),)
    assert GatedObjective(w, losses, ("t", "u", "t", "t")).twins() == ()  # tokenizers differ


def test_prune_equals_inert_and_lower_bound() -> None:
    """GatedObjective.prune names the same experts as inert and gives bitwise the same bound as
    lower_bound over the rest (Objective.prune, the reference): at k = 1 in its fused pass, at k > 1
    without a cutoff. With one (k > 1), a bound it returns early still exceeds the cutoff and is no
    more than the full bound."""
    rng = random.Random(37)
    checked = {1: 0, 2: 0, 3: 0}
    for _ in range(500):
        problem = rand_problem(rng, rng.randint(2, 9), r=6) if rng.random() < 0.5 else twin_problem(rng, 8, 6)
        obj, n, k = problem.objective, len(problem.experts), rng.choice([1, 1, 2, 3])
        idx = rng.sample(range(n), n)
        cut = rng.randint(1, n - 1)
        fixed, allowed = idx[:cut], idx[cut : cut + rng.randint(1, n - cut)]
        if any(obj.inert([f for f in fixed if f != g], [g], k) for g in fixed):
            continue  # prune expects fixed free of unused experts, as the search keeps it
        dead, full = Objective.prune(obj, fixed, allowed, k)
        assert obj.prune(fixed, allowed, k) == (dead, full)
        cutoff = full + rng.uniform(-0.3, 0.1)
        got, bound = obj.prune(fixed, allowed, k, cutoff)
        assert got == dead and (bound == full or cutoff < bound <= full), (bound, full, cutoff)
        checked[k] += 1
    assert min(checked.values()) >= 70, checked


def test_tail_bounds_hold_against_enumeration() -> None:
    """At random nodes (fixed, allowed), k = 1: tail_bounds[p] <= the value of every completion of
    (fixed, allowed[p:]), and is None at k > 1."""
    rng = random.Random(41)
    checked = 0
    for _ in range(150):
        problem = rand_problem(rng, rng.randint(2, 8), r=6) if rng.random() < 0.5 else twin_problem(rng, 7, 6)
        obj, n = problem.objective, len(problem.experts)
        idx = rng.sample(range(n), n)
        cut = rng.randint(0, n - 1)
        fixed, allowed = idx[:cut], idx[cut : cut + rng.randint(1, n - cut)]
        tails = obj.tail_bounds(fixed, allowed, 1)
        assert len(tails) == len(allowed) and obj.tail_bounds(fixed, allowed, 2) is None
        for p, bound in enumerate(tails):
            rest = allowed[p:]
            for size in range(len(rest) + 1):
                for extra in itertools.combinations(rest, size):
                    if fixed or extra:
                        assert bound <= obj.value([*fixed, *extra], 1)
                        checked += 1
    assert checked >= 1000, checked


# The exact search before twins, the greedy seed and the fused prune (docs/benchmarks.md, 2026-12-07:
# 20-634 ms, 184-4676 subsets evaluated): its optimum for each 64-expert row of the benchmark.
BEFORE_64 = {
    (0, "loose"): ("agx/gemma3-270m/int8", "agx/smollm2-360m/int8", "cloud/llama-8b"),
    (0, "tight"): ("agx/gemma3-270m/int8", "agx/smollm2-135m/fp32", "agx/smollm2-360m/int8"),
    (1, "loose"): ("agx/gemma3-270m/int8", "agx/smollm2-135m/fp32", "agx/smollm2-360m/int8", "cloud/llama-8b"),
    (1, "tight"): ("agx/gemma3-270m/int8", "agx/smollm2-135m/int8", "agx/smollm2-360m/int8"),
}


@pytest.mark.parametrize(("seed", "name"), sorted(BEFORE_64))
def test_benchmark_fleet_at_64_experts(seed: int, name: str) -> None:
    """The benchmark's 64-expert rows (k = 1): the same optimum as the slower exact search, found by
    evaluating few subsets (a count, not a time: the host is shared)."""
    problem = bench_fleet(64, 128, seed)
    got = select(problem, Budget(*BUDGETS[name], k=1))
    assert got.subset == BEFORE_64[seed, name]
    assert got.objective == problem.objective.value([problem.index(i) for i in got.subset], 1)
    assert got.evaluated <= 100, got.evaluated
