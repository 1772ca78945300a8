"""An agent's calibration: what its hub predicts it by.

A device profiled with `tandem profile` carries its measured calibration in its profile file; an
agent started with that file uses it, and refuses to start if the file was measured for another
model, precision or engine (device_profiles.DeviceProfile.calibration_for). An agent with a shipped
profile, which holds no measurements, calibrates itself at start-up: the eight quick samples of
edge_agent.profiler (a few seconds), fitted by partitioner.calibration.fit against the profile's
roofline, then anchored to one real request through the serving path (`anchor`): the profiler times
the model's layers, a request also pays for tokenizing, detokenizing and the generator's own Python
per token, which is what the hub will measure. Either way the calibration travels to the hub in
the Hello (ModelInfo.calibration_json), which then refits it online from every request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from device_profiles import Calibration, CalibrationError, DeviceProfile
from edge_agent import profiler
from models.sampling import SamplingParams
from models.serving import ServedModel
from models.threads import GOVERNOR
from partitioner import calibration as calib
from partitioner.cost import ModelCost
from tandem.files import private_dir, write_private

log = logging.getLogger("tandem.agent")

PROBE_TOKENS = (96, 32)
"""The anchoring request: prompt tokens, generated tokens."""


def agent_calibration(
    served: ServedModel, model: str, quant: str, engine: str, profile: DeviceProfile
) -> tuple[Calibration, str]:
    """(calibration, how it was obtained) for `served` (unpaced: the host's own speed) as `model` at
    `quant` on `engine`. Raises device_profiles.ProfileError when `profile` holds calibrations, none of
    them for this."""
    held = profile.calibration_for(model, quant, engine)
    if held is not None:
        return held, f"calibrated by its profile ({len(held.samples)} samples measured)"
    start = time.perf_counter()
    GOVERNOR.apply()  # the threads it will serve with now: fewer where a neighbour keeps a core busy
    samples = profiler.quick_samples(served.loaded, quick_grid(served.loaded.config.context_length))
    cost = profiler.model_cost(served.loaded)
    cal = anchor(calib.fit(samples, profile, cost, model, quant, engine), cost, served)
    took = time.perf_counter() - start
    log.info("calibrated itself from %d samples and one request in %.1f s", len(samples), took)
    return cal, f"calibrated itself ({len(samples)} samples and one request, {took:.1f} s)"


CACHE_MAX_AGE_S = 7 * 86400.0
"""How long a start-up calibration is reused by a restarted agent. The hub refits every device online
from its requests' measured times, so a calibration a few days old is a fine starting point; a week
bounds how far a drifting machine (a new neighbour, a BIOS update) starts from."""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def cache_key(served: ServedModel, model: str, quant: str, engine: str, profile: DeviceProfile) -> str:
    """What a calibration was measured for: the model as served (name, precision, weights' bytes and
    config), the engine, the profile, this machine's CPU and core count, and this agent's version."""
    try:
        agent = version("tandem")
    except PackageNotFoundError:
        agent = ""
    parts = [model, quant, engine, profile.name, str(served.info.get("weight_bytes")),
             str(served.info.get("config_json")), _cpu_name(), str(os.cpu_count()), agent]  # fmt: skip
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def cached_calibration(
    cache: Path | None, served: ServedModel, model: str, quant: str, engine: str, profile: DeviceProfile
) -> tuple[Calibration, str]:
    """agent_calibration, reusing one this agent measured for the same model and machine in the last
    CACHE_MAX_AGE_S (kept in `cache`, e.g. its state dir's calibrations/): a restarted, reflashed or
    rolled-back agent is online in seconds instead of re-measuring (a minute and more on a busy host,
    where the profiler waits out other processes). A cache file that cannot be read is measured over."""
    if cache is None or profile.calibration_for(model, quant, engine) is not None:
        return agent_calibration(served, model, quant, engine, profile)
    path = cache / f"{cache_key(served, model, quant, engine, profile)}.json"
    try:
        age = time.time() - path.stat().st_mtime
        if age < CACHE_MAX_AGE_S:
            cal = Calibration.from_json(path.read_text())
            return cal, f"calibration reused from {age / 3600:.1f} h ago (same model and machine)"
    except (OSError, ValueError, CalibrationError):
        pass
    cal, how = agent_calibration(served, model, quant, engine, profile)
    try:
        private_dir(cache)  # beside the credential: the agent's state dir is private, its files too
        write_private(path, cal.to_json(samples=True))
    except OSError as exc:  # a read-only state dir costs the next start its calibration, nothing more
        log.warning("could not keep the calibration in %s: %s", cache, exc)
    return cal, how


def quick_grid(context: int) -> profiler.Grid:
    """The quick grid within a model's context: its points that fit (a decode sample needs room for its
    steps), or, for a model whose context is shorter than most of them, four points spread over it."""
    g = profiler.QUICK
    room = context - 2 * g.decode_steps - 4
    prefill = tuple(n for n in g.prefill if n <= room)
    decode = tuple(c for c in g.decode if c <= room)
    if len(prefill) < 3:
        prefill = tuple(max(1, room * k // 8) for k in (1, 2, 4, 8))
    if len(decode) < 3:
        decode = tuple(max(1, room * k // 8) for k in (1, 2, 4, 8))
    return dataclasses.replace(g, prefill=prefill, decode=decode)


def anchor(cal: Calibration, cost: ModelCost, served: ServedModel) -> Calibration:
    """`cal` adjusted to one real request through `served` (the second of two; the first warms up).

    Its first token's time beyond the calibrated prefill becomes the fixed request overhead (or, when
    the prefill is over-predicted, the prefill coefficients shrink by the ratio); its time per token
    rescales the decode coefficients. Both keep the fit's shape over lengths."""
    prompt, new = PROBE_TOKENS
    ids = [(7 + 13 * i) % max(2, served.loaded.config.vocab_size - 1) + 1 for i in range(prompt)]
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    for _ in range(2):
        t0 = time.perf_counter()
        times = [time.perf_counter() for _ in served.stream(ids, params, threading.Event())]
    ttft = (times[0] - t0) * 1000
    tpot = (times[-1] - times[0]) * 1000 / (len(times) - 1)
    prefill = calib.prefill_ms(cal, cost, prompt) + cal.request_ms
    step = calib.decode_ms(cal, cost, prompt + new / 2)
    if ttft >= prefill:
        cal = dataclasses.replace(cal, request_ms=cal.request_ms + ttft - prefill)
    else:
        cal = dataclasses.replace(cal, prefill=tuple(c * ttft / prefill for c in cal.prefill))
    return dataclasses.replace(cal, decode=tuple(c * tpot / step for c in cal.decode))
