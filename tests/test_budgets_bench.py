"""benchmarks/budgets.py's oracle: what an admission knowing the mean costs and the noise exactly
would admit, keep and wrongly refuse. Synthetic costs and ratios, no fleet."""

from __future__ import annotations

import pytest

from benchmarks.budgets import Request, oracle, p_meet

REF = {"ttft": [(16, 100.0), (1024, 1100.0)], "tpot": 10.0, "energy": 0.01}
NOISE = ([0.9, 1.0, 1.1, 1.2], [1.0])  # TTFT 0.9-1.2x its mean, time per token exactly its mean


def test_p_meet_counts_the_ratios_that_fit_every_limit() -> None:
    ttft = REF["ttft"][0][1] + 1000.0 * (520 - 16) / (1024 - 16)  # the mean at 520 tokens: 600 ms
    assert p_meet(Request("", 520, 32, ttft_ms=ttft * 1.1), REF, NOISE) == pytest.approx(0.75)
    assert p_meet(Request("", 520, 32, ttft_ms=ttft * 1.25), REF, NOISE) == 1.0
    assert p_meet(Request("", 520, 32, ttft_ms=ttft * 0.85), REF, NOISE) == 0.0
    # both limits: TTFT at 0.75 and a time per token the mean misses
    assert p_meet(Request("", 520, 32, ttft_ms=ttft * 1.1, tpot_ms=9.9), REF, NOISE) == 0.0
    assert p_meet(Request("", 520, 32, energy_j=0.01 * 32 * 1.01), REF, NOISE) == 1.0
    assert p_meet(Request("", 520, 32, ttft_ms=1.0), REF, ([], [1.0])) == 0.0  # nothing measured: no promise


def test_the_oracle_trades_admissions_against_refusals_of_feasible_requests() -> None:
    refs = {"a": REF, "b": {**REF, "ttft": [(16, 200.0), (1024, 2200.0)]}}  # b: twice as slow to the first token
    noise = {"a": NOISE, "b": NOISE}
    at_mean = REF["ttft"][0][1]  # a 16-token prompt's mean TTFT on a
    requests = [Request("", 16, 8, ttft_ms=at_mean * f) for f in (0.95, 1.05, 1.15, 1.3)]
    strict = oracle(requests, refs, noise, 0.95)
    # Only 1.3x is sure on a (1.2x is the slowest ratio); the rest are refused, though one run on a
    # meets 1.05x half the time (0.9, 1.0) and 1.15x three times in four, and 0.95x one time in four.
    assert strict["admitted"] == 1 and strict["kept_rate"] == 1.0
    assert strict["rejected_feasible_rate"] == pytest.approx((0.25 + 0.5 + 0.75) / 3)
    lax = oracle(requests, refs, noise, 0.5)
    assert lax["admitted"] == 3 and lax["kept_rate"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    assert lax["rejected_feasible_rate"] == pytest.approx(0.25)
