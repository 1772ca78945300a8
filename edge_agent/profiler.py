"""Measuring a model on this device: the samples a calibration is fitted to, and a measured profile.

What each sample means is fixed by device_profiles.Sample; the single measurements behind them, each
on the model's own code path, and the machine's peaks are edge_agent.measurements. Here they are
repeated over grids (round-robin, and again when other processes took the CPU meanwhile), fitted
and written to a profile file.

Times are medians over repeats (a decode repeat is the mean of several steps), in milliseconds.
`quick_samples` takes the eight samples an agent calibrates itself with at start-up (a few
seconds); `profile_device` measures the full grids, the memory bandwidth, the matmul throughput
and, where a sensor exists, the power, and returns a DeviceProfile that `write_profile` saves.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from device_profiles import Calibration, DeviceProfile, Efficiency, ProfileError, Sample, load_profile
from edge_agent.measurements import (
    cpu_name,
    decode_times,
    layers_within,
    matmul_tflops,
    measure_head,
    measure_request,
    memory_bandwidth_gbs,
    memory_gb,
    power_while,
    prefill_times,
    release,
)
from edge_agent.power import PowerSensor
from models.loaded import LoadedModel
from models.quant import weight_bytes
from models.threads import cpu_seconds
from models.transformer import Transformer
from partitioner import calibration as calib
from partitioner.cost import ModelCost, served_model_cost

log = logging.getLogger("tandem.profiler")

ENGINES = ("cpu",)
"""What computes the measured steps: "cpu" is the model's own generator (our kernels for quantized
layers, torch's ops otherwise). Engines of edge_agent.engines are not profiled yet."""


@dataclass(frozen=True)
class Grid:
    """What to measure: prompt lengths and contexts, and how hard."""

    prefill: tuple[int, ...]
    """Prompt lengths (tokens) to measure one layer's prefill at."""
    decode: tuple[int, ...]
    """Contexts (positions) to measure a decode step at."""
    repeats: int = 3
    """Repeats of each measurement; a sample holds their median."""
    decode_steps: int = 8
    """Steps one decode repeat averages over."""
    prefill_budget_s: float | None = None
    """Seconds one prefill repeat may take: fewer layers (whole sliding periods) run when all would
    take longer. None: always every layer."""
    max_foreign: float = 0.2
    """A repeat during which other processes used more than this share of the machine's CPU time
    (or the hypervisor stole it) is measured again, up to `retries` times (then the least
    disturbed one counts): on a shared host a neighbour's burst otherwise doubles a time."""
    retries: int = 3


FULL = Grid(calib.PREFILL_GRID, calib.DECODE_GRID, repeats=3, decode_steps=16)
"""`tandem profile` and the benchmark: every grid point through every layer."""
QUICK = Grid(calib.QUICK_PREFILL, calib.QUICK_DECODE, repeats=3, decode_steps=8, prefill_budget_s=0.15, retries=2)
"""An agent's start-up calibration: 8 samples in about 3 s for SmolLM2 int4 on two cores."""


@dataclass(frozen=True)
class Measured:
    """One finished measurement, as a progress callback sees it."""

    what: str
    """What was measured, e.g. "prefill 256 tokens"."""
    result: str
    """Its figure with units, e.g. "13.2 ms/layer"."""
    seconds: float
    """Wall time the measurement took, repeats included."""
    done: int
    """Measurements finished so far, this one included."""
    total: int
    """Measurements planned."""


Progress = Callable[[Measured], None]


# -- the model's cost sizes -------------------------------------------------------------------------


def model_cost(loaded: LoadedModel) -> ModelCost:
    """The cost sizes the hub predicts this model with (one cost rule: served_model_cost of the
    weight bytes it advertises), so the calibration's features are the hub's."""
    return served_model_cost(loaded.config, weight_bytes(loaded.model))


# -- other processes --------------------------------------------------------------------------------


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    """`fn()`'s result and the share of the machine's CPU time (all cores, over fn's wall time)
    that other processes or the hypervisor took meanwhile (0: the machine was ours; 10 ms clock
    ticks make it coarse for a short fn)."""
    busy0, own0 = cpu_seconds()
    t0 = time.perf_counter()
    value = fn()
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_seconds()
    foreign = (busy1 - busy0) - (own1 - own0)
    return value, max(0.0, foreign / (wall * (os.cpu_count() or 1)))


def undisturbed(fn: Callable[[], float], max_foreign: float, retries: int) -> tuple[float, float, int]:
    """`fn()` run until other processes took at most `max_foreign` of the CPU meanwhile, or
    1 + retries times: (the least disturbed try's result, its foreign share, the tries made)."""
    best, tries = (math.inf, 0.0), 0
    while tries <= retries:
        value, foreign = timed(fn)
        tries += 1
        best = min(best, (foreign, value))
        if foreign <= max_foreign:
            break
    return best[1], best[0], tries


# -- grids ------------------------------------------------------------------------------------------


Point = tuple[str, int]
"""("prefill", prompt tokens) or ("decode", context)."""


def _point(model: Transformer, grid: Grid, point: Point, layers: int | None) -> tuple[Callable[[], float], str]:
    """One repeat of `point` as a function returning its ms, and what it measures."""
    kind, size = point
    if kind == "prefill":
        what = f"prefill {size} tokens" + (f" ({layers} layers)" if layers not in (None, model.cfg.n_layers) else "")
        return (lambda: prefill_times(model, size, 1, layers)[0]), what
    return (lambda: decode_times(model, size, grid.decode_steps, 1)[0]), f"decode at {size}"


def measure_points(
    loaded: LoadedModel, grid: Grid = FULL, progress: Progress | None = None, planned_after: int = 0
) -> dict[Point, list[float]]:
    """Every repeat of every point of `grid`: per-layer prefill ms and per-step decode ms.
    `planned_after`: measurements the caller will report after these (for Measured.total).

    Repeats go round-robin over the points (the whole grid once, then again), so that a burst of
    load from another process spoils one repeat of several points rather than every repeat of
    one; a repeat that ran while others took the CPU is measured again (Grid.max_foreign), and
    each point's median rejects what is left."""
    model = loaded.model
    points: list[Point] = [("prefill", t) for t in grid.prefill] + [("decode", c) for c in grid.decode]
    total, n = len(points) * grid.repeats + planned_after, 0
    out: dict[Point, list[float]] = {p: [] for p in points}
    with torch.inference_mode():
        prefill_times(model, 16, 1)  # warm-up: the first GEMMs allocate and fault pages in
        budget = grid.prefill_budget_s
        layers = {t: None if budget is None else layers_within(model, t, budget) for t in grid.prefill}
        for r in range(grid.repeats):
            for point in points:
                t0 = time.perf_counter()
                fn, what = _point(model, grid, point, layers.get(point[1]) if point[0] == "prefill" else None)
                ms, foreign, tries = undisturbed(fn, grid.max_foreign, grid.retries)
                out[point].append(ms)
                n += 1
                if progress is not None:
                    unit = "ms/layer" if point[0] == "prefill" else "ms/token"
                    busy = f" (busy host: {tries} tries, {foreign:.0%} foreign)" if tries > 1 else ""
                    seconds = time.perf_counter() - t0
                    progress(Measured(f"{what} [{r + 1}/{grid.repeats}]", f"{ms:.3f} {unit}{busy}", seconds, n, total))
    release(model)
    return out


def measure_grid(
    loaded: LoadedModel,
    grid: Grid = FULL,
    progress: Progress | None = None,
    extras: bool = True,
    planned_after: int = 0,
) -> list[Sample]:
    """One sample a point of `grid` (the median of its repeats: measure_points), prefill then
    decode, then with `extras` the head and the request overhead."""
    n_extra = 2 if extras else 0
    points = measure_points(loaded, grid, progress, planned_after + n_extra)
    samples = [Sample(kind, float(size), statistics.median(ms)) for (kind, size), ms in points.items()]
    done, total = len(points) * grid.repeats, len(points) * grid.repeats + n_extra + planned_after
    extra = [("head", lambda: measure_head(loaded.model)), ("request", lambda: measure_request(loaded))]
    for what, measure in extra[:n_extra]:
        t0 = time.perf_counter()
        samples.append(measure())
        done += 1
        if progress is not None:
            progress(Measured(what, f"{samples[-1].ms:.3f} ms", time.perf_counter() - t0, done, total))
    release(loaded.model)
    return samples


def quick_samples(loaded: LoadedModel, grid: Grid = QUICK, progress: Progress | None = None) -> list[Sample]:
    """The eight samples of a start-up calibration: prefill at QUICK_PREFILL, decode at
    QUICK_DECODE (about 3 s for SmolLM2 int4 on two cores). Fit them with partitioner.calibration.fit."""
    return measure_grid(loaded, grid, progress, extras=False)


# -- a measured profile -----------------------------------------------------------------------------


def _prefill_tflops(cost: ModelCost, s: Sample) -> float:
    """FLOP rate a prefill sample reached, TFLOPS (= GFLOP per ms)."""
    _, matmul, attention = calib.prefill_features(cost, s.tokens)
    return (matmul + attention) / s.ms


def efficiency(cal: Calibration, cost: ModelCost, tflops: float, bandwidth_gbs: float) -> Efficiency:
    """The shares of the measured peaks the calibrated model reaches at 512 tokens: prefill FLOPs
    over their calibrated time, decode bytes over theirs; kept in (0, 1]."""
    p = calib.prefill_features(cost, 512)
    d = calib.decode_features(cost, 512)
    reached_tflops = (p[1] + p[2]) / calib.layer_prefill_ms(cal, cost, 512)  # GFLOP per ms = TFLOPS
    reached_gbs = (d[1] + d[2]) / calib.decode_ms(cal, cost, 512)  # MB per ms = GB/s
    return Efficiency(
        prefill=min(1.0, max(1e-3, reached_tflops / tflops)), decode=min(1.0, max(1e-3, reached_gbs / bandwidth_gbs))
    )


def profile_device(
    loaded: LoadedModel,
    model_name: str,
    quant: str,
    engine: str,
    base_profile: DeviceProfile,
    grid: Grid = FULL,
    progress: Progress | None = None,
    sensors: Sequence[PowerSensor] | None = None,
) -> DeviceProfile:
    """Measure `loaded` on this machine and return `base_profile` as measured here: memory size,
    read bandwidth and fp32 GEMM throughput measured; power measured when a sensor exists (else
    the base's, an estimate); efficiencies from the calibration; calibrations = (the fit of every
    sample of `grid`, the head and the request overhead); `quant` the default precision. The name
    (the device class the hub knows), link and backends stay the base's; the description says
    where and when it was measured. Raises ValueError for an unknown engine."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    started = datetime.datetime.now(datetime.UTC)
    cost = model_cost(loaded)
    samples = measure_grid(loaded, grid, progress, planned_after=1)
    t0 = time.perf_counter()
    bandwidth, tflops = memory_bandwidth_gbs(), matmul_tflops()
    # Our int4 kernels can outrun torch's fp32 GEMM (MKL on an AMD CPU reaches ~40% of peak): the
    # peak is then what the model itself reached, so that efficiency stays within (0, 1].
    tflops = max(tflops, max(_prefill_tflops(cost, s) for s in samples if s.kind == "prefill"))
    if progress is not None:
        n = (len(grid.prefill) + len(grid.decode)) * grid.repeats + 3
        seconds = time.perf_counter() - t0
        progress(Measured("memory bandwidth, fp32 GEMM", f"{bandwidth:.1f} GB/s, {tflops:.3f} TFLOPS", seconds, n, n))
    power_w, sensor = power_while(lambda: prefill_times(loaded.model, 512, 3), sensors)
    cal = calib.fit(samples, base_profile, cost, model_name, quant, engine, power_w, sensor)
    cpu = cpu_name()
    when = started.strftime("%Y-%m-%d %H:%M UTC")
    power = f"{power_w:.1f} W measured ({sensor})" if sensor else f"power from {base_profile.name} (estimate)"
    return dataclasses.replace(
        base_profile,  # its name stays: the hub knows a device by its class (registry, placements)
        description=(
            f"{cpu}, {os.cpu_count()} CPUs: measured on {socket.gethostname()} by tandem profile, {when} "
            f"({model_name} {quant} on {engine}; base {base_profile.name}; {power})"
        ),
        memory_gb=memory_gb(),
        memory_bandwidth_gbs=bandwidth,
        compute_tflops=tflops,
        power_active_w=power_w or base_profile.power_active_w,
        efficiency=efficiency(cal, cost, tflops, bandwidth),
        calibrations=(cal,),
        quant=quant,  # an agent started with this file serves the precision it was measured at
    )


# -- the file -----------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Dataclasses to dicts (field order kept), tuples to lists: what yaml.safe_dump writes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _header(profile: DeviceProfile) -> str:
    lines = [f"Device profile written by `tandem profile`: {profile.description}"]
    for c in profile.calibrations:
        kinds = sample_counts(c.samples)
        lines.append(f"Calibration {c.model} ({c.quant}, {c.engine}) from {kinds}.")
    lines.append("Measured here: memory_gb, memory_bandwidth_gbs (a sum over 256 MB), compute_tflops (an fp32 GEMM),")
    lines.append("efficiency (calibrated times at 512 tokens over those peaks); link and backends are the base's.")
    return "".join(f"# {line}\n" for line in lines)


def sample_counts(samples: Sequence[Sample]) -> str:
    """The samples counted by kind, e.g. "8 prefill, 7 decode, 1 head, 1 request samples"."""
    counts = {k: sum(s.kind == k for s in samples) for k in ("prefill", "decode", "head", "request")}
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n) + " samples"


def write_profile(profile: DeviceProfile, path: str | os.PathLike[str]) -> Path:
    """Write `profile` as YAML in the loader's schema, with a header saying what was measured,
    where and when. Atomic: a temporary file in the same directory is written, read back with
    load_profile and checked equal to `profile`, then renamed over `path`; on any failure it is
    removed and `path` is untouched. Raises ProfileError naming the file."""
    path = Path(path)
    text = _header(profile) + yaml.safe_dump(_plain(profile), sort_keys=False, default_flow_style=None, width=120)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".yaml")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot write device profile: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if load_profile(tmp) != profile:  # a bug here, not in the file: never leave it behind
            raise ProfileError(f"{path}: the written profile does not read back equal")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a profile is not a secret
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ProfileError(f"{path}: cannot write device profile: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
