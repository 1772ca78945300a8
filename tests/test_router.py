"""The budget router, as pure functions over profiles and the cost model."""

from __future__ import annotations

import pytest

from cloud_hub.candidates import Candidate
from cloud_hub.errors import BudgetUnsatisfiable
from cloud_hub.router import Budget, BudgetRouter
from device_profiles import load_profile
from partitioner.cost import ModelCost, predict
from tests.test_cost import SMOLLM2

COST = ModelCost.from_config(SMOLLM2, bits_per_weight=32.0)


def cand(kind: str, profile: str, device: str = "", queued: int = 0) -> Candidate:
    return Candidate(kind, device, load_profile(profile), "smollm2", COST, queued)


PI, CPU, CLOUD = cand("edge", "raspberry-pi-5", "pi"), cand("edge", "cpu-2core", "cpu"), cand("cloud", "cloud-h100")


def test_prefers_the_edge_with_least_energy_when_all_fit() -> None:
    choice = BudgetRouter().choose([CLOUD, PI, CPU], 50, 32, Budget())
    assert choice.candidate.kind == "edge" and choice.within_budget
    energies = {c.device_id: predict(c.profile, COST, 50, 32).edge_energy_j for c in (PI, CPU)}
    assert choice.candidate.device_id == min(energies, key=energies.get)


def test_cloud_serves_when_no_edge_meets_the_latency_budget() -> None:
    edge_best = min(predict(c.profile, COST, 400, 32).ttft_ms for c in (PI, CPU))
    cloud = predict(CLOUD.profile, COST, 400, 32).ttft_ms
    assert cloud < edge_best, "the H100 profile must predict a faster first token than the edge devices"
    choice = BudgetRouter().choose([PI, CPU, CLOUD], 400, 32, Budget(ttft_ms=(cloud + edge_best) / 2))
    assert choice.candidate is CLOUD


@pytest.mark.parametrize("binding", ["ttft_ms", "tpot_ms", "energy_j"])
def test_unsatisfiable_budget_names_the_binding_constraint(binding: str) -> None:
    budget = Budget(**{binding: 1e-6})
    with pytest.raises(BudgetUnsatisfiable, match=f"binding constraint {binding}") as info:
        BudgetRouter().choose([PI, CPU], 50, 32, budget)
    assert info.value.binding == binding


def test_best_effort_serves_the_closest_placement() -> None:
    choice = BudgetRouter().choose([PI, CPU], 50, 32, Budget(tpot_ms=1e-3, best_effort=True))
    assert not choice.within_budget
    tpots = {c.device_id: predict(c.profile, COST, 50, 32).tpot_ms for c in (PI, CPU)}
    assert choice.candidate.device_id == min(tpots, key=tpots.get)


def test_a_busy_device_loses_to_an_idle_one() -> None:
    idle = BudgetRouter().choose([PI, CPU], 50, 32, Budget()).candidate
    busy = cand("edge", idle.profile.name, idle.device_id, queued=3)
    other = PI if idle is CPU else CPU
    budget = Budget(ttft_ms=predict(idle.profile, COST, 50, 32).total_ms * 2)
    assert BudgetRouter().choose([busy, other], 50, 32, budget).candidate is other


def test_no_candidates_is_unsatisfiable() -> None:
    with pytest.raises(BudgetUnsatisfiable, match="no device is online"):
        BudgetRouter().choose([], 10, 10, Budget())


def test_a_split_that_fits_no_memory_is_ruled_out_by_memory() -> None:
    from dataclasses import replace

    from cloud_hub.candidates import SplitSpec
    from cloud_hub.estimates import split_plan

    tiny = replace(load_profile("raspberry-pi-5"), name="tiny-board", memory_gb=0.001)
    split = Candidate("split", "pi", tiny, "smollm2", COST, split=SplitSpec((("pi", tiny),), CLOUD.profile))
    with pytest.raises(BudgetUnsatisfiable, match="binding constraint memory") as info:
        BudgetRouter().choose([split], 50, 32, Budget())
    assert info.value.binding == "memory" and len(info.value.considered) == 1
    # beside a placement that fits, the split is weighed and loses on memory alone
    choice = BudgetRouter().choose([split, CLOUD], 50, 32, Budget())
    assert choice.candidate is CLOUD
    assert [s[3] for s in choice.considered if s[0] is split] == [{"memory": float("inf")}]
    # one that fits is planned per request: an interior cut, its stages named by device id
    roomy = Candidate("split", "pi", PI.profile, "smollm2", COST, split=SplitSpec((("pi", PI.profile),), CLOUD.profile))
    plan = split_plan(roomy.split, COST, 400, 32)
    assert [s.device for s in plan.stages] == ["pi", "cloud"] and 0 < plan.cuts[0] < COST.n_layers


def test_calibrated_stage_parts_add_up_to_the_calibrated_prediction() -> None:
    from device_profiles import Calibration
    from partitioner.calibration import prior
    from partitioner.predict import compute_ms, stage_parts

    profile = load_profile("cpu-2core")
    p, d = prior(profile)
    cal = Calibration("smollm2", "fp32", "cpu", (0.01, p[1] * 1.7, p[2]), (0.3, d[1] * 0.8, d[2]), 2.0, 5.0)
    parts = stage_parts(cal)
    assert stage_parts(None) is None
    (block_p, head_p), (block_d, head_d) = parts(profile, COST, 300, 316.0)
    prefill, step = compute_ms(profile, COST, cal, 300, 316.0)
    assert COST.n_layers * block_p + head_p == pytest.approx(prefill, rel=1e-12)
    assert COST.n_layers * block_d + head_d == pytest.approx(step, rel=1e-12)
    # emulated: never faster than the profile's roofline, block by block
    slow = Calibration("smollm2", "fp32", "cpu", tuple(x / 100 for x in p), tuple(x / 100 for x in d))
    (eb, eh), (db, dh) = stage_parts(slow, emulated=True)(profile, COST, 300, 316.0)
    from partitioner import split

    assert eb >= split.layer_prefill_ms(profile, COST, 300) and db >= split.layer_decode_ms(profile, COST, 316.0)
    assert eh >= split.head_prefill_ms(profile, COST, 300) and dh >= split.head_decode_ms(profile, COST, 316.0)


def test_measure_uplink_subtracts_the_round_trip_and_the_prefill() -> None:
    from types import SimpleNamespace

    from cloud_hub.split import measure_uplink

    session = SimpleNamespace(rtt_ms=40.0, uplink_mbps=None)
    # 100 kB in 40 ms of transfer after a 40 ms round trip and a 20 ms prefill: 20 Mbit/s
    assert measure_uplink(session, 100_000, 100.0, 20.0) == pytest.approx(20.0)  # type: ignore[arg-type]
    assert session.uplink_mbps == pytest.approx(20.0)
    assert measure_uplink(session, 100_000, 180.0, 20.0) == pytest.approx(6.67, rel=1e-2)  # type: ignore[arg-type]
    assert session.uplink_mbps == pytest.approx((20.0 + 6.667) / 2, rel=1e-3)  # a moving average
    assert measure_uplink(session, 100_000, 61.0, 20.0) is None  # too short a transfer to tell: kept
    assert session.uplink_mbps == pytest.approx(13.33, rel=1e-3)


def test_a_split_pipeline_learns_its_own_fixed_costs_and_admits_at_its_quantile() -> None:
    """A plan that misses a fixed 40 ms before the first token and 5 ms a step (the hops between the
    hub and its stages) is predicted within 5% after a few answers; a slower second prompt size is
    predicted by the same intercepts, not by a gain fitted to one size."""
    from cloud_hub.calibrations import WARMUP_REQUESTS, Tracker, split_key
    from cloud_hub.candidates import SplitSpec
    from cloud_hub.estimates import estimate, split_estimate, weigh
    from tandem.v1 import tandem_pb2 as pb

    spec = SplitSpec((("pi", PI.profile),), CLOUD.profile)
    tracker = Tracker()
    c = Candidate("split", "pi", PI.profile, "smollm2", COST, split=spec, tracker=tracker)
    assert split_key(["pi"]) == "split:pi" and split_key(["a", "b"]) == "split:a,b"
    assert estimate(c, 300, 32).ttft_ms == split_estimate(spec, COST, 300, 32).ttft_ms  # nothing learnt yet
    for i in range(8):
        tokens = (100, 400)[i % 2]
        raw = split_estimate(spec, COST, tokens, 32)
        placement = pb.Placement(predicted_ttft_ms=estimate(c, tokens, 32).ttft_ms,
                                 predicted_tpot_ms=estimate(c, tokens, 32).tpot_ms)  # fmt: skip
        m = pb.Metrics(ttft_ms=raw.ttft_ms + 40 + 3, queue_ms=3, tpot_ms=raw.tpot_ms + 5, completion_tokens=32,
                       prompt_tokens=tokens)  # fmt: skip
        tracker.observe_split(raw.ttft_ms, raw.tpot_ms, placement, m)
    # The first WARMUP_REQUESTS were predicted before the intercepts had learnt anything: no ratios.
    kept = 8 - WARMUP_REQUESTS
    assert tracker.requests == 8 and len(tracker.ttft.ratios) == kept and len(tracker.tpot.ratios) == kept
    for tokens in (100, 250, 400):
        raw, got = split_estimate(spec, COST, tokens, 32), estimate(c, tokens, 32)
        assert got.ttft_ms == pytest.approx(raw.ttft_ms + 40, rel=0.05)
        assert got.tpot_ms == pytest.approx(raw.tpot_ms + 5, rel=0.05)
    mean, admitted = weigh(c, 250, 32, 0, 0.95)
    assert admitted.ttft_ms >= mean.ttft_ms * 0.999 and admitted.tpot_ms >= mean.tpot_ms * 0.999


def test_a_new_calibration_of_a_stage_restarts_its_splits_trackers() -> None:
    """A split's corrections were fitted against plans built from its stages' calibrations: a device
    (or the hub) re-profiled starts the trackers of the splits it is a stage of afresh, no others."""
    from cloud_hub.calibrations import Calibrations
    from device_profiles import Calibration
    from partitioner.calibration import prior

    p, d = prior(load_profile("cpu-2core"))
    cal = Calibration("smollm2", "fp32", "cpu", p, d)
    cals = Calibrations()
    for key in ("split:a", "split:a,b", "split:b", "split:c"):
        cals.get(key, "smollm2").requests = 3
    cals.get("split:a", "other").requests = 3
    cals.set_calibration("a", "smollm2", cal)
    requests = {key: cals.get(key, "smollm2").requests for key in ("split:a", "split:a,b", "split:b", "split:c")}
    assert requests == {"split:a": 0, "split:a,b": 0, "split:b": 3, "split:c": 3}
    assert cals.get("split:a", "other").requests == 3  # another model's split
    cals.set_calibration("cloud", "smollm2", cal)  # the hub is a stage of every split of its model
    assert all(cals.get(key, "smollm2").requests == 0 for key in ("split:b", "split:c"))
