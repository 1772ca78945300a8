"""The calibrated cost model: the few-sample fit, the online corrections, quantile admission, emulation
that cannot lie, and the hub keeping what it learnt in its registry. Pure numbers, no model."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from cloud_hub.calibrations import WARMUP_REQUESTS, Calibrations, Tracker, calibration_from_json
from cloud_hub.candidates import Candidate
from cloud_hub.errors import BudgetUnsatisfiable
from cloud_hub.router import Budget, BudgetRouter
from cloud_hub.store import SQLiteStore
from device_profiles import Calibration, CalibrationError, ProfileError, Sample, load_profile
from partitioner import calibration as cal
from partitioner.cost import ModelCost
from partitioner.predict import Corrections, faster_than_host, predict
from tandem.v1 import tandem_pb2 as pb
from tests.test_cost import SMOLLM2

CFG = SMOLLM2
COST = ModelCost.from_config(CFG, bits_per_weight=5.0)
PROFILE = load_profile("cpu-2core")
# A made-up device the fit has never seen: overheads and efficiencies unlike the profile's prior.
TRUE_P = (0.05, 9.0, 14.0)  # ms, ms per matmul GFLOP, ms per attention GFLOP (one layer)
TRUE_D = (1.5, 0.12, 0.3)  # ms, ms per weight MB, ms per KV MB (one step)


def truth(kind: str, tokens: float, noise: float = 0.0, rng: random.Random | None = None) -> float:
    coef, feats = (
        (TRUE_P, cal.prefill_features(COST, tokens))
        if kind == "prefill"
        else (TRUE_D, cal.decode_features(COST, tokens))
    )
    value = sum(c * f for c, f in zip(coef, feats, strict=True))
    return value * (1 + noise * (rng.uniform(-1, 1) if rng else 0))


def test_eight_samples_fit_a_device_the_prior_does_not_know() -> None:
    rng = random.Random(0)
    samples = [Sample("prefill", n, truth("prefill", n, 0.03, rng)) for n in cal.QUICK_PREFILL]
    samples += [Sample("decode", c, truth("decode", c, 0.03, rng)) for c in cal.QUICK_DECODE]
    assert len(samples) == 8
    c = cal.fit(samples, PROFILE, COST, "m", "source", "cpu")
    errors = [abs(cal.layer_prefill_ms(c, COST, n) / truth("prefill", n) - 1) for n in cal.PREFILL_GRID]
    errors += [abs(cal.decode_ms(c, COST, x) / truth("decode", x) - 1) for x in cal.DECODE_GRID]
    assert cal.quantile(errors, 0.5) < 0.05 and max(errors) < 0.15, errors
    # The analytic prior alone is far off on this device: the fit did the work.
    prior = Calibration("m", "source", "cpu", *cal.prior(PROFILE))
    off = [abs(cal.decode_ms(prior, COST, x) / truth("decode", x) - 1) for x in cal.DECODE_GRID]
    assert cal.quantile(off, 0.5) > 0.3


def test_fit_keeps_coefficients_non_negative_and_needs_both_kinds() -> None:
    # Decode that does not grow with context: the KV term must come out 0, not negative.
    flat = [Sample("decode", c, 5.0 + 0.01 * (i % 2)) for i, c in enumerate(cal.QUICK_DECODE)]
    pre = [Sample("prefill", n, truth("prefill", n)) for n in cal.QUICK_PREFILL]
    c = cal.fit(pre + flat, PROFILE, COST, "m", "int4", "cpu")
    assert all(v >= 0 for v in (*c.prefill, *c.decode))
    assert cal.decode_ms(c, COST, 4096) == pytest.approx(5.0, rel=0.05)
    with pytest.raises(ValueError, match="at least one prefill and one decode"):
        cal.fit(pre, PROFILE, COST, "m", "int4", "cpu")


@pytest.mark.parametrize("ms", [0.0, -1.0, math.nan, math.inf])
def test_a_measurement_that_is_not_positive_is_refused(ms: float) -> None:
    with pytest.raises(CalibrationError, match="ms: a measured time must be a positive finite number"):
        Sample("decode", 64, ms)


def test_online_gain_follows_a_device_that_slows_down_within_ten_requests() -> None:
    gain = cal.OnlineGain()
    rng = random.Random(1)
    for _ in range(20):  # calibrated and steady: the gain stays near 1
        gain.update(10.0, 10.0 * rng.uniform(0.95, 1.05))
    assert gain.gain == pytest.approx(1.0, abs=0.05)
    for _ in range(10):  # now twice as slow
        g = gain.update(10.0, 20.0 * rng.uniform(0.95, 1.05))
    assert abs(g * 10.0 / 20.0 - 1) < 0.15, g
    assert gain.update(10.0, 0.0) == g  # a request that measured nothing teaches nothing


def test_ratio_quantile_is_the_high_tail_and_never_below_one() -> None:
    r = cal.RatioQuantile(window=100, min_samples=5, prior=1.3)
    assert r.quantile(0.95) == 1.3  # too few to know: the prior
    for i in range(100):
        r.add(10.0, 10.0 * (0.8 + 0.5 * i / 99))  # ratios spread over 0.8..1.3
    assert r.quantile(0.95) == pytest.approx(0.8 + 0.5 * 0.95, abs=0.01)
    assert r.quantile(0.5) == pytest.approx(1.05, abs=0.01)
    faster = cal.RatioQuantile(min_samples=1)
    faster.add(10.0, 5.0)
    assert faster.quantile(0.95) == 1.0  # measured faster than predicted is not banked


def _cal(speed: float = 1.0) -> Calibration:
    return Calibration("m", "source", "cpu", tuple(v * speed for v in TRUE_P), tuple(v * speed for v in TRUE_D))


def test_emulation_predicts_the_slower_of_profile_and_host() -> None:
    host = _cal()
    jetson = load_profile("jetson-agx-orin")  # its roofline is far faster than TRUE_* on this "host"
    est = predict(jetson, COST, 128, 32, host, emulated=True)
    real = predict(jetson, COST, 128, 32, host)
    profile_only = predict(jetson, COST, 128, 32)
    assert est.decode_ms == pytest.approx(real.decode_ms) and est.decode_ms > profile_only.decode_ms
    assert "faster than this host" in faster_than_host(jetson, COST, host)
    slow_host = _cal(1e-3)  # a host faster than the profile: the profile's speed holds, and no warning
    assert predict(jetson, COST, 128, 32, slow_host, emulated=True).decode_ms == pytest.approx(profile_only.decode_ms)
    assert faster_than_host(jetson, COST, slow_host) == ""


def test_corrections_scale_prediction_and_measured_link_replaces_profile() -> None:
    base = predict(PROFILE, COST, 100, 16, _cal())
    slow = predict(PROFILE, COST, 100, 16, _cal(), Corrections(cal.Affine(0, 2.0), cal.Affine(0, 3.0), link_ms=7.0))
    assert slow.prefill_ms == pytest.approx(2 * base.prefill_ms)
    assert slow.decode_ms == pytest.approx(3 * base.decode_ms)
    assert slow.ttft_ms == pytest.approx(7.0 + slow.prefill_ms)


def _candidate(tracker: Tracker | None, queued: int = 0) -> Candidate:
    return Candidate("edge", "d1", PROFILE, "m", COST, queued, False, tracker)


def test_admission_uses_the_quantile_and_the_answer_says_which() -> None:
    t = Tracker(_cal())
    for i in range(40):  # this device is often 40% over its mean prediction
        t.ttft.add(10.0, 10.0 * (1.4 if i % 4 == 0 else 0.95))
    router = BudgetRouter(quantile=0.9)
    mean = router.choose([_candidate(t)], 100, 16, Budget()).estimate.ttft_ms
    # A budget the mean meets but the 0.9 quantile does not: refused, and the message says why.
    with pytest.raises(BudgetUnsatisfiable, match=r"0\.9 quantile"):
        router.choose([_candidate(t)], 100, 16, Budget(ttft_ms=mean * 1.1))
    choice = router.choose([_candidate(t)], 100, 16, Budget(ttft_ms=mean * 1.5))
    assert choice.quantile == 0.9 and choice.admitted is not None
    assert choice.admitted.ttft_ms == pytest.approx(mean * 1.4, rel=0.01)
    # Without a tracker the router admits on the mean, as before.
    plain = router.choose([_candidate(None)], 100, 16, Budget())
    assert plain.quantile == 0.0 and plain.admitted is None


def test_queue_is_in_the_prediction() -> None:
    t = Tracker(_cal())
    idle = BudgetRouter().choose([_candidate(t)], 100, 16, Budget()).estimate
    busy = BudgetRouter().choose([_candidate(t, queued=2)], 100, 16, Budget()).estimate
    assert busy.ttft_ms == pytest.approx(idle.ttft_ms + 2 * idle.total_ms)


def _metrics(ttft: float, tpot: float, prefill: float, decode: float, prompt: int = 100) -> pb.Metrics:
    return pb.Metrics(
        prompt_tokens=prompt,
        completion_tokens=16,
        ttft_ms=ttft,
        tpot_ms=tpot,
        prefill_ms=prefill,
        decode_ms=decode,
    )


def _serve_slower(t: Tracker, factor: float, n: int, seed: int = 3) -> None:
    """n requests on a device `factor` times slower than its calibration (+-5% noise), each predicted
    with the corrections of its time, as the hub predicts them."""
    rng = random.Random(seed)
    for _ in range(n):
        tokens = rng.choice((40, 200, 700))
        est = predict(PROFILE, COST, tokens, 16, t.calibration, t.corrections())
        raw = predict(PROFILE, COST, tokens, 16, t.calibration)
        prefill, tpot = (factor * v * rng.uniform(0.95, 1.05) for v in (raw.prefill_ms, raw.tpot_ms))
        placement = pb.Placement(predicted_ttft_ms=est.ttft_ms, predicted_tpot_ms=est.tpot_ms)
        t.observe(PROFILE, COST, False, placement, _metrics(prefill, tpot, prefill, tpot, tokens), 16)


def test_the_start_up_gap_is_learnt_but_never_admitted_on() -> None:
    """A device that serves 2.5x slower than its start-up calibration (timed alone, it misses the
    hub and the caller beside it) is learnt from its first requests, but their ratios are not kept:
    its admission quantile reflects the steady noise (+-5%), where a window of 64 ratios would keep
    the gap for its next 60 requests."""
    t = Tracker(_cal())
    _serve_slower(t, 2.5, 12)
    assert t.requests == 12 and len(t.ttft.ratios or ()) == len(t.tpot.ratios or ()) == 12 - WARMUP_REQUESTS
    m_ttft, m_tpot = t.multipliers(0.95)
    assert m_ttft < 1.2 and m_tpot < 1.2, (m_ttft, m_tpot)
    # The same stream with every ratio kept (a tracker already past its warm-up): the gap is the quantile.
    counted = Tracker(_cal(), requests=WARMUP_REQUESTS)
    _serve_slower(counted, 2.5, 12)
    assert len(counted.ttft.ratios or ()) == 12 and min(counted.multipliers(0.95)) > 1.5


def test_tracker_learns_from_requests_and_the_registry_keeps_it(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "registry.db")
    cals = Calibrations(store, quantile=0.95)
    info = pb.ModelInfo(name="m", calibration_json=_cal().to_json())
    cals.attach("d1", [info])
    t = cals.get("d1", "m")
    assert t.calibration == _cal()
    est = predict(PROFILE, COST, 100, 16, t.calibration)
    placement = pb.Placement(predicted_ttft_ms=est.ttft_ms, predicted_tpot_ms=est.tpot_ms)
    for _ in range(12):  # the device runs 2x slower than calibrated
        t.observe(
            PROFILE,
            COST,
            False,
            placement,
            _metrics(2 * est.ttft_ms, 2 * est.tpot_ms, 2 * est.prefill_ms, 2 * est.decode_ms),
            16,
        )
    now = predict(PROFILE, COST, 100, 16, t.calibration, t.corrections())
    assert abs(now.decode_ms / (2 * est.decode_ms) - 1) < 0.15
    assert abs(now.prefill_ms / (2 * est.prefill_ms) - 1) < 0.15
    cals.save("d1", "m", force=True)
    again = Calibrations(SQLiteStore(tmp_path / "registry.db")).get("d1", "m")  # a restarted hub
    assert again.corrections() == t.corrections() and list(again.ttft.ratios) == list(t.ttft.ratios)
    assert again.requests == t.requests == 12  # past its warm-up: not repeated after a restart
    # The device re-profiled: a new calibration starts its tracker afresh.
    cals.attach("d1", [pb.ModelInfo(name="m", calibration_json=_cal(1.5).to_json())])
    assert cals.get("d1", "m").corrections().prefill == cal.Affine()


def test_malformed_calibration_json_is_named_and_ignored_by_the_hub() -> None:
    with pytest.raises(CalibrationError, match="calibration_json"):
        calibration_from_json('{"model": "m"}')
    bad = dataclasses.asdict(_cal())
    bad["prefill"] = [1.0, -2.0, 3.0]
    import json

    with pytest.raises(CalibrationError, match="prefill"):
        calibration_from_json(json.dumps(bad))
    cals = Calibrations()
    cals.attach("d1", [pb.ModelInfo(name="m", calibration_json="{not json")])  # logged, not raised
    assert cals.get("d1", "m").calibration is None


def test_a_profile_measured_for_another_model_is_refused() -> None:
    prof = dataclasses.replace(PROFILE, calibrations=(_cal(),))
    assert prof.calibration_for("m", "source", "cpu") == _cal()
    with pytest.raises(ProfileError, match=r"calibrations: .*not other"):
        prof.calibration_for("other", "source", "cpu")
    with pytest.raises(ProfileError, match=r"calibrations: .*not m \(fp32, cpu\)"):
        prof.calibration_for("m", "fp32", "cpu")
