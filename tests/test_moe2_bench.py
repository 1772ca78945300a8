"""benchmarks/moe2.py's pure pieces: held-out routing against an independent loop, and the verdict's
counting of infeasible budgets. Synthetic gate table (tests/test_moe2_fleet.py), no models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.moe2 import FLEET, Outcome, compare, grid, held_out, outcome, paired_se, significant, verdict
from benchmarks.moe2_report import plot, tables
from partitioner.moe2.experts import Budget
from partitioner.moe2.fleet import load_fleet, plan_problem
from partitioner.moe2.objective import column_objective
from partitioner.moe2.registry import POLICIES, make_policy
from tests.test_moe2_fleet import VARIANT_IDS, fake_card, synthetic_table


@pytest.fixture(scope="module")
def fleet_and_eval():
    """The example fleet on a synthetic calibration table, and an evaluation objective from another seed."""
    cal, ev = synthetic_table(64, seed=1), synthetic_table(40, seed=2)
    planned = plan_problem(load_fleet(FLEET, VARIANT_IDS), cal, fake_card)
    evaluation = column_objective(ev.weights, ev.losses, ev.tokenizers, ev.n_bytes, planned.columns)
    return planned, evaluation


def test_top1_routing_on_held_out_requests_equals_a_plain_loop(fleet_and_eval) -> None:
    planned, evaluation = fleet_and_eval
    problem = planned.problem
    for budget in (Budget(4.0, 800.0), Budget(None, None), Budget(8.0, 300.0)):
        chosen = make_policy("moe2").choose(problem, budget)
        idx = [problem.index(i) for i in chosen.subset]
        top = [max(idx, key=lambda i, r=r: (evaluation.weights[r, i], -i)) for r in range(evaluation.n_requests)]
        losses, energy, latency = held_out(problem, evaluation, chosen, 1)
        assert losses.mean() == pytest.approx(np.mean([evaluation.losses[r, i] for r, i in enumerate(top)]), abs=1e-12)
        assert energy == pytest.approx(np.mean([problem.experts[i].energy_j for i in top]))
        assert latency == pytest.approx(np.mean([problem.experts[i].latency_ms for i in top]))
        assert latency <= chosen.latency_ms + 1e-9 and energy <= chosen.energy_j + 1e-9


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("k", [1, 2])
def test_held_out_on_the_calibration_requests_is_the_policys_own_objective(fleet_and_eval, name: str, k: int) -> None:
    """Routed on the requests it selected on, every policy's selection scores its own objective (the
    threshold router's routing included)."""
    planned, _ = fleet_and_eval
    problem = planned.problem
    budgets = [Budget(4.0, 1600.0, k)] + [Budget(16.0, 400.0, k)] * (name != "cloud_only")  # the cloud: 1.3 s
    for budget in budgets:
        chosen = make_policy(name).choose(problem, budget)
        losses, _, _ = held_out(problem, problem.objective, chosen, 1 if chosen.threshold is not None else k)
        assert losses.mean() == pytest.approx(chosen.objective, abs=1e-12)


def _o(policy: str, bpb: float | None) -> Outcome:
    return Outcome(policy, 1.0, 100.0, 1, ("x",), bpb, bpb) if bpb is not None else Outcome(policy, 1.0, 100.0, 1)


def test_infeasible_budgets_count_for_the_feasible_side_and_ties_within_tolerance() -> None:
    assert compare(_o("moe2", 1.0), _o("greedy", None)) == -1
    assert compare(_o("moe2", None), _o("greedy", 1.0)) == 1
    assert compare(_o("moe2", None), _o("greedy", None)) == 0
    assert compare(_o("moe2", 1.0), _o("greedy", 1.0 + 1e-12)) == 0
    assert compare(_o("moe2", 1.1), _o("greedy", 1.0)) == 1
    rows = [_o("moe2", 1.0), *(_o(b, 1.2) for b in POLICIES if b != "moe2")]
    v = verdict(rows)
    assert v["goal_met"] and set(v["better"].values()) == {1} and set(v["worse"].values()) == {0}
    worse = [_o("moe2", 1.0), *(_o(b, 0.9 if b == "greedy" else None) for b in POLICIES if b != "moe2")]
    v = verdict(worse)
    assert not v["goal_met"] and v["worse"]["greedy"] == 1 and v["better"]["cloud_only"] == 1


def _paired(policy: str, losses: list[float]) -> Outcome:
    x = np.asarray(losses)
    return Outcome(policy, 1.0, 100.0, 1, ("x",), float(x.mean()), float(x.mean()), losses=x)


def test_beyond_the_noise_counts_only_differences_over_two_paired_standard_errors() -> None:
    base = np.linspace(0.8, 1.2, 50)
    noisy = base + np.where(np.arange(50) % 2 == 0, 0.01, -0.0098)  # mean +0.0001, paired SE about 0.0014
    clear = base + 0.01 + np.where(np.arange(50) % 2 == 0, 0.001, -0.001)  # +0.01, SE about 0.00014
    others = [_paired(b, list(base)) for b in POLICIES if b not in ("moe2", "greedy")]
    v = verdict([_paired("moe2", list(base)), _paired("greedy", list(noisy)), *others])
    assert v["better"]["greedy"] == 1 and v["better_2se"]["greedy"] == 0 and not v["goal_met_2se"]
    v = verdict([_paired("moe2", list(noisy)), _paired("greedy", list(base)), *others])
    assert v["worse"]["greedy"] == 1 and v["worse_2se"]["greedy"] == 0 and not v["goal_met"]
    v = verdict([_paired("moe2", list(clear)), _paired("greedy", list(base)), *others])
    assert v["worse_2se"]["greedy"] == 1
    v = verdict([_paired("moe2", list(base)), *(_paired(b, list(clear)) for b in POLICIES if b != "moe2")])
    assert v["goal_met"] and v["goal_met_2se"] and set(v["better_2se"].values()) == {1}
    assert v["calibration_margin"]["greedy"] == pytest.approx(0.01)


def test_paired_se_counts_a_document_once_however_many_requests_it_gave() -> None:
    rng = np.random.default_rng(0)
    diff = rng.standard_normal(40)
    np.testing.assert_allclose(paired_se(diff), diff.std(ddof=1) / np.sqrt(40))
    one_each = np.arange(40)  # every request its own document: the same as by request
    np.testing.assert_allclose(paired_se(diff, one_each), diff.std(ddof=1) / np.sqrt(40))
    copies = np.repeat(diff[:10], 4)  # ten documents, each cut four times into the same difference
    docs = np.repeat(np.arange(10), 4)
    assert paired_se(copies, docs) == pytest.approx(diff[:10].std(ddof=1) / np.sqrt(10))
    assert paired_se(copies) < paired_se(copies, docs) / 1.9  # by request it would claim twice the precision
    assert np.isnan(paired_se(diff[:1])) and np.isnan(paired_se(diff[:4], np.zeros(4, dtype=int)))
    base = np.linspace(0.8, 1.2, 40)
    ours, theirs = _paired("moe2", list(base + copies * 0.0 + 0.002)), _paired("greedy", list(base))
    assert significant(ours, theirs)  # a constant difference: no noise at all
    infeasible = Outcome("greedy", 1.0, 100.0, 1)
    assert significant(infeasible, theirs) and not significant(theirs, infeasible)
    assert not significant(infeasible, Outcome("random", 1.0, 100.0, 1))


def test_the_whole_grid_runs_and_moe2_wins_on_its_own_objective(fleet_and_eval, tmp_path: Path) -> None:
    planned, evaluation = fleet_and_eval
    rows = [outcome(p, planned, evaluation, b) for b in grid([1]) for p in POLICIES]
    assert verdict(rows, "calibration_bpb")["worse"] == dict.fromkeys(verdict(rows)["worse"], 0)
    text = tables(rows)
    assert text.count("\n| ") == 2 * (len(grid([1])) + 1)  # two tables: a row a budget, and the header
    assert plot(rows, tmp_path / "moe2.png").stat().st_size > 10_000
