"""benchmarks/budgets.py's oracle: what an admission knowing the costs and the spread of one run
would admit, keep and wrongly refuse. Synthetic costs and spreads, no fleet."""

from __future__ import annotations

import pytest

from benchmarks.budgets import Request, feasible_somewhere, oracle, p_meet

# TTFT 0.9-1.2x its median, time per token exactly its median, 2 W while answering.
NOISE = [(0.9, 1.0), (1.0, 1.0), (1.1, 1.0), (1.2, 1.0)]
REF = {"ttft": [(16, 100.0), (1024, 1100.0)], "tpot": 10.0, "energy": 0.02, "power_w": 2.0, "noise": NOISE}


def test_p_meet_counts_the_runs_that_keep_every_limit() -> None:
    ttft = 100.0 + 1000.0 * (520 - 16) / (1024 - 16)  # the median at 520 tokens: 600 ms
    assert p_meet(Request("", 520, 32, ttft_ms=ttft * 1.1), REF) == pytest.approx(0.75)
    assert p_meet(Request("", 520, 32, ttft_ms=ttft * 1.25), REF) == 1.0
    assert p_meet(Request("", 520, 32, ttft_ms=ttft * 0.85), REF) == 0.0
    # both limits of one run: TTFT in three runs of four, a time per token none meets
    assert p_meet(Request("", 520, 32, ttft_ms=ttft * 1.1, tpot_ms=9.9), REF) == 0.0
    # energy: 2 W x (TTFT + 31 steps of 10 ms): 1.70, 1.82, 1.94 and 2.06 J
    assert p_meet(Request("", 520, 32, energy_j=1.85), REF) == pytest.approx(0.5)
    assert p_meet(Request("", 520, 32, ttft_ms=1e9), {**REF, "noise": []}) == 0.0  # nothing measured: no promise


def test_feasible_somewhere_takes_one_run_on_each_placement() -> None:
    req = Request("", 16, 8, ttft_ms=105.0)  # half of the runs on a (0.9x, 1.0x)
    assert feasible_somewhere(req, {"a": REF}) == pytest.approx(0.5)
    assert feasible_somewhere(req, {"a": REF, "b": REF}) == pytest.approx(1 - 0.5**2)
    slow = {**REF, "ttft": [(16, 200.0), (1024, 2200.0)]}
    assert feasible_somewhere(req, {"a": REF, "b": slow}) == pytest.approx(0.5)


def test_the_oracle_trades_admissions_against_refusals_of_feasible_requests() -> None:
    refs = {"a": REF, "b": {**REF, "ttft": [(16, 200.0), (1024, 2200.0)]}}  # b: twice as slow to the first token
    requests = [Request("", 16, 8, ttft_ms=100.0 * f) for f in (0.95, 1.05, 1.15, 1.3)]
    strict = oracle(requests, refs, 0.95)
    # Only 1.3x is sure on a (1.2x is the slowest run); the rest are refused, though one run on a
    # meets 0.95x one time in four, 1.05x two and 1.15x three.
    assert strict["admitted"] == 1 and strict["kept_rate"] == 1.0
    assert strict["rejected_feasible_rate"] == pytest.approx((0.25 + 0.5 + 0.75) / 3)
    lax = oracle(requests, refs, 0.5)
    assert lax["admitted"] == 3 and lax["kept_rate"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    assert lax["rejected_feasible_rate"] == pytest.approx(0.25)
