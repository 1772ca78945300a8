"""What the hub knows of each placement's speed: its calibration, and what it has measured since.

One `Tracker` per (device, model), the cloud's own model under device "cloud":

- the calibration the agent measured at start-up (ModelInfo.calibration_json) or the cloud profile's
  (`tandem profile`); None means the profile's analytic roofline;
- online corrections of prefill and decode, each measured = a + b x predicted
  (partitioner.calibration.OnlineAffine), refitted from the prefill and decode times every finished
  request reports. `a` is the fixed cost per request that serving beside the hub and the other
  agents adds and a calibration timed alone misses (with one gain instead, short prompts' prefill
  was under-predicted by up to ~30% and 1,000-token prompts' over-predicted by ~20%), `b` the gain;
  a device that slows down is predicted slower within a few requests. Decode too: for one model a
  step's prediction is affine in the KV read at its context, so a + b x absorbs an error in any of
  its calibrated coefficients, and where contexts hardly vary the fit is a gain;
- the link as measured: the work channel's ping round trips, and each request's time outside the
  engine before its first token (hub to device and back, the hub's own handling);
- the distributions of measured over predicted TTFT and time per token (RatioQuantile), whose
  high quantile admission multiplies predictions by. A tracker's first WARMUP_REQUESTS requests
  refit the corrections but add no ratio: they are predicted by the calibration alone, before the
  corrections have learnt what serving adds to it (an agent timed alone at start-up served its first
  answers 2-3x slower than calibrated on this 2-core host, beside the hub and the caller). In the
  64-ratio window each such ratio would set the 0.95 quantile until about 20 more had come.

A split pipeline has a tracker of its own, under `split_key` of its agents: no calibration (its
stages' are the devices' own), and its corrections fitted to whole answers (`observe_split`): TTFT
against the plan's TTFT, time per token against its step. What a plan's parts miss (the hops
between the hub's loop, its worker thread and each stage, the relay of hidden states, serving
beside the rest) is a fixed cost per request and per step, which the intercepts learn.

`Calibrations` holds the trackers and keeps them in the registry (`CalibrationStore`), so that a hub
restart does not forget what it learnt; a new calibration from the agent (a re-profiled device)
starts its tracker afresh.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cloud_hub.store import CalibrationStore
from device_profiles import Calibration, CalibrationError, DeviceProfile
from partitioner.calibration import OnlineAffine, RatioQuantile
from partitioner.cost import ModelCost
from partitioner.predict import Corrections, compute_ms
from tandem.v1 import tandem_pb2 as pb

log = logging.getLogger("tandem.hub")

LINK_SMOOTHING = 0.3
"""Weight of the newest measurement in the link's moving averages."""
SAVE_EVERY_S = 5.0
"""A tracker is written to the registry at most this often (and when its device disconnects)."""
WARMUP_REQUESTS = 3
"""Requests a tracker learns from before its ratios count towards admission. After three, a
prediction 2.8x off at the first is within about 15% at the sizes seen (OnlineAffine's prior weighs
half a request); until RatioQuantile.min_samples ratios are known its prior stands in. The count is
kept in the registry: a restarted hub does not warm up again."""


SPLIT_PREFIX = "split:"


def split_key(devices: Sequence[str]) -> str:
    """The tracker key of a split over these agents, in pipeline order ("split:a" or "split:a,b")."""
    return SPLIT_PREFIX + ",".join(devices)


def calibration_from_json(text: str) -> Calibration | None:
    """A Calibration from ModelInfo.calibration_json ('' -> None). Raises CalibrationError naming
    the field for a malformed one."""
    return Calibration.from_json(text) if text else None


def served_calibration(profile: DeviceProfile, info: pb.ModelInfo) -> Calibration | None:
    """The calibration `profile` holds for the model `info` describes, as it is served (its precision:
    ModelInfo.quant up to any "(detail)"; its engine, "cpu" when unnamed). None for an uncalibrated
    profile; raises ProfileError for one measured for another model, precision or engine."""
    quant = info.quant.split("(", 1)[0] or "fp32"
    return profile.calibration_for(info.name, quant, info.engine or "cpu")


@dataclass
class Tracker:
    """One (device, model): its calibration and the corrections measured since."""

    calibration: Calibration | None = None
    prefill: OnlineAffine = field(default_factory=OnlineAffine)
    decode: OnlineAffine = field(default_factory=OnlineAffine)
    ttft: RatioQuantile = field(default_factory=RatioQuantile)
    tpot: RatioQuantile = field(default_factory=RatioQuantile)
    link_ms: float | None = None
    """Moving average of a request's time outside the engine before its first token."""
    rtt_ms: float | None = None
    """The work channel's ping round trip now (AgentSession.rtt_ms, set as candidates are listed)."""
    requests: int = 0
    saved: float = 0.0

    def corrections(self) -> Corrections:
        return Corrections(self.prefill.affine, self.decode.affine, self.link())

    def link(self) -> float | None:
        """The link before the first token as measured: per request where requests have been seen,
        else the pings' round trip, else None (the profile's figures)."""
        return self.link_ms if self.link_ms is not None else self.rtt_ms

    @property
    def warm(self) -> bool:
        """Past its first WARMUP_REQUESTS: its measured-over-predicted ratios count towards admission."""
        return self.requests >= WARMUP_REQUESTS

    def multipliers(self, q: float) -> tuple[float, float]:
        """(TTFT, TPOT) factors admission applies: the q-quantiles of measured over predicted."""
        return self.ttft.quantile(q), self.tpot.quantile(q)

    def observe(
        self,
        profile: DeviceProfile,
        cost: ModelCost,
        emulated: bool,
        placement: pb.Placement,
        metrics: pb.Metrics,
        new_tokens: int,
        kv_layers: int | None = None,
        skip_layers: int | None = None,
    ) -> None:
        """Learn from one finished request: `metrics` as the hub measured it (ttft_ms, tpot_ms) with
        the engine's own prefill_ms, decode_ms and queue_ms, `placement` as predicted. `kv_layers`:
        it ran with KV prediction through an auxiliary model of that many layers (compute_ms).
        `skip_layers`: its decode skipped that many layers (models.skip): its steps are shorter than
        the whole model's, so they refit no decode correction, and its time per token counts towards
        admission only where the placement predicted the skipping (Placement.skip_ratio); its
        prefill ran every layer and counts as any other."""
        prompt = max(1, metrics.prompt_tokens)
        context = prompt + max(1, new_tokens) / 2
        prefill, step = compute_ms(profile, cost, self.calibration, prompt, context, emulated, kv_layers)
        skipped = skip_layers is not None
        # Ratios first, against the queue-free TTFT predicted with the corrections of the time.
        queue = metrics.queue_ms
        link = self.link()
        link = profile.link.rtt_ms if link is None else link
        warm = self.warm
        if metrics.ttft_ms > 0 and warm:
            self.ttft.add(link + self.prefill.correct(prefill), max(1e-3, metrics.ttft_ms - queue))
        predicted_skipping = not skipped or placement.skip_ratio > 0
        if (
            warm
            and metrics.tpot_ms > 0
            and placement.predicted_tpot_ms > 0
            and metrics.completion_tokens > 2
            and predicted_skipping
        ):
            self.tpot.add(placement.predicted_tpot_ms, metrics.tpot_ms)
        if metrics.prefill_ms > 0:
            self.prefill.update(prefill, metrics.prefill_ms)
            outside = metrics.ttft_ms - queue - metrics.prefill_ms
            if outside >= 0:
                self.link_ms = _smooth(self.link_ms, outside)
        if metrics.decode_ms > 0 and metrics.completion_tokens > 2 and not skipped:
            self.decode.update(step, metrics.decode_ms)
        self.requests += 1

    def observe_split(self, ttft_ms: float, tpot_ms: float, placement: pb.Placement, metrics: pb.Metrics) -> None:
        """Learn from one finished split request: `ttft_ms` and `tpot_ms` its plan's uncorrected
        prediction (estimates.split_estimate), `placement` as predicted (corrected), `metrics` as the
        hub measured it. The prefill correction maps the plan's TTFT to the measured one, less its
        queue; the decode correction its step to the measured time per token."""
        ttft = metrics.ttft_ms - metrics.queue_ms
        warm = self.warm
        if metrics.ttft_ms > 0:
            if warm:
                self.ttft.add(self.prefill.correct(ttft_ms), max(1e-3, ttft))
            self.prefill.update(ttft_ms, ttft)
        if metrics.tpot_ms > 0 and metrics.completion_tokens > 2:
            if placement.predicted_tpot_ms > 0 and warm:
                self.tpot.add(placement.predicted_tpot_ms, metrics.tpot_ms)
            self.decode.update(tpot_ms, metrics.tpot_ms)
        self.requests += 1

    # -- persistence ------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "calibration": self.calibration.to_json() if self.calibration else "",
                "prefill": self.prefill.state(),
                "decode": self.decode.state(),
                "ttft": list(self.ttft.ratios or ()),
                "tpot": list(self.tpot.ratios or ()),
                "link_ms": self.link_ms,
                "requests": self.requests,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Tracker:
        """The tracker `to_json` wrote; one written before the affine corrections (a gain per kind,
        "prefill": [num, den]) loads as a = 0, b = its gain. Raises ValueError, TypeError or KeyError
        for a malformed one (Calibrations drops it)."""
        d = json.loads(text)
        t = cls(calibration_from_json(d["calibration"]))
        t.prefill = OnlineAffine.from_state(d["prefill"])
        t.decode = OnlineAffine.from_state(d["decode"])
        t.ttft.ratios.extend(d["ttft"])  # type: ignore[union-attr]
        t.tpot.ratios.extend(d["tpot"])  # type: ignore[union-attr]
        t.link_ms, t.requests = d["link_ms"], d["requests"]
        return t


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else (1 - LINK_SMOOTHING) * old + LINK_SMOOTHING * new


class Calibrations:
    """Trackers by (device id, model), kept in the registry; the cloud's device id is "cloud"."""

    def __init__(self, store: CalibrationStore | None = None, quantile: float = 0.95, enabled: bool = True) -> None:
        if not 0.5 <= quantile < 1:
            raise ValueError(f"the admission quantile must be in [0.5, 1), got {quantile}")
        self.store = store
        self.quantile = quantile
        self.enabled = enabled
        """False: routing ignores calibrations (the profiles' roofline, mean admission), for comparison."""
        self.trackers: dict[tuple[str, str], Tracker] = {}

    def routing(self, device_id: str, model: str) -> Tracker | None:
        """The tracker routing uses for this placement: None when calibration is off."""
        return self.get(device_id, model) if self.enabled else None

    def get(self, device_id: str, model: str) -> Tracker:
        key = (device_id or "cloud", model)
        t = self.trackers.get(key)
        if t is None:
            t = self.trackers[key] = self._load(*key) or Tracker()
        return t

    def attach(self, device_id: str, models: tuple[pb.ModelInfo, ...] | list[pb.ModelInfo]) -> None:
        """A device connected with these models: take each one's calibration. A calibration unlike
        the one the tracker was built on (the device was re-profiled, or serves another precision)
        starts the tracker afresh; the same one keeps what was learnt. A malformed calibration is
        logged and ignored (the profile's roofline stands in), never fatal to the channel."""
        for m in models:
            try:
                cal = calibration_from_json(m.calibration_json)
            except CalibrationError as exc:
                log.warning("device %s model %s: ignoring its calibration: %s", device_id, m.name, exc)
                cal = None
            self.set_calibration(device_id, m.name, cal)

    def set_calibration(self, device_id: str, model: str, cal: Calibration | None) -> Tracker:
        t = self.get(device_id, model)
        if cal != t.calibration:
            t = self.trackers[(device_id or "cloud", model)] = Tracker(cal)
            self.save(device_id, model, force=True)
            for key in self._splits_of(device_id or "cloud", model):  # fitted against plans of the old one
                self.trackers[key] = Tracker()
                self.save(*key, force=True)
        return t

    def _splits_of(self, device_id: str, model: str) -> list[tuple[str, str]]:
        """The keys of the split pipelines' trackers of `model` that `device_id` is a stage of (every
        split holds the hub's own model: "cloud" is a stage of each)."""
        return [
            (key, m)
            for key, m in self.trackers
            if m == model
            and key.startswith(SPLIT_PREFIX)
            and (device_id == "cloud" or device_id in key[len(SPLIT_PREFIX) :].split(","))
        ]

    def save(self, device_id: str, model: str, force: bool = False) -> None:
        key = (device_id or "cloud", model)
        t = self.trackers.get(key)
        if t is None or self.store is None:
            return
        now = time.monotonic()
        if force or now - t.saved >= SAVE_EVERY_S:
            t.saved = now
            self.store.save_calibration(key[0], model, t.to_json())

    def save_device(self, device_id: str) -> None:
        """Flush the trackers of `device_id` (and of the splits it is a stage of)."""
        for dev, model in list(self.trackers):
            if dev == device_id or (dev.startswith(SPLIT_PREFIX) and device_id in dev[len(SPLIT_PREFIX) :].split(",")):
                self.save(dev, model, force=True)

    def _load(self, device_id: str, model: str) -> Tracker | None:
        if self.store is None:
            return None
        text = self.store.load_calibration(device_id, model)
        if not text:
            return None
        try:
            return Tracker.from_json(text)
        except (ValueError, TypeError, KeyError, CalibrationError) as exc:
            log.warning("registry: dropping the stored calibration of %s/%s: %s", device_id, model, exc)
            return None
