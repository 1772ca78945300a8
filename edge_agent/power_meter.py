"""Energy of a block of work from one power sensor (edge_agent.power), or estimated without one.

`EnergyMeter` measures a block of work with either kind of `PowerSensor`: the counter's
difference, or power sampled in a daemon thread and integrated (`trapezoid`). `estimated` is the
reading to report when nothing can be read. `PowerGauge` gives telemetry the average power since
its last reading. Units as in edge_agent.power: joules, watts, seconds from `time.perf_counter`.
Kept apart from the sensors (edge_agent.power_sensors): it works with any kind, through the
`PowerSensor` interface alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

from edge_agent.power import PowerSensor, SensorError

log = logging.getLogger("edge_agent.power")  # the logger the gauge used before the split


@dataclass(frozen=True)
class Reading:
    """The energy of one measured interval."""

    joules: float
    """Energy used in the interval (J)."""
    seconds: float
    """The interval's length (s)."""
    watts: float
    """Mean power over it (W): joules / seconds."""
    sensor: str
    """The sensor's name; "" for an estimate (no sensor could be read)."""

    @property
    def estimated(self) -> bool:
        return not self.sensor


def _reading(joules: float, seconds: float, sensor: str) -> Reading:
    return Reading(joules, seconds, joules / seconds if seconds > 0 else 0.0, sensor)


def estimated(power_w: float, seconds: float) -> Reading:
    """The reading to report without a sensor: a power figure (a profile's, say) x the time."""
    if power_w < 0 or seconds < 0:
        raise ValueError(f"power_w and seconds must be non-negative, got {power_w} and {seconds}")
    return Reading(power_w * seconds, seconds, power_w, "")


class Measurement:
    """What `EnergyMeter.measure()` yields: its reading once the block has ended."""

    def __init__(self) -> None:
        self._reading: Reading | None = None

    @property
    def reading(self) -> Reading:
        if self._reading is None:
            raise RuntimeError("still measuring: the reading exists once the with block has ended")
        return self._reading

    @property
    def joules(self) -> float:
        return self.reading.joules

    @property
    def seconds(self) -> float:
        return self.reading.seconds

    @property
    def watts(self) -> float:
        return self.reading.watts

    @property
    def sensor(self) -> str:
        return self.reading.sensor


class EnergyMeter:
    """Measures the energy of a block of work on one sensor.

    Counter sensors: the counter's difference, read at start and stop, and every `keepalive_s` in
    a daemon thread so that no RAPL wrap goes unseen. Power-only sensors: power sampled every
    `interval_s` in a daemon thread and integrated by the trapezoid rule between the samples taken
    at start and at stop. The thread sleeps on an Event between reads (no busy loop): the work
    pays one file read (tens of microseconds) per sample. A read that fails in the thread stops
    sampling and `stop()` raises its SensorError.
    """

    def __init__(
        self,
        sensor: PowerSensor,
        interval_s: float = 0.02,
        keepalive_s: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if interval_s <= 0 or keepalive_s <= 0:
            raise ValueError("interval_s and keepalive_s must be positive")
        self.sensor = sensor
        self.interval_s = interval_s
        self.keepalive_s = keepalive_s
        self.clock = clock
        self.samples: list[tuple[float, float]] = []  # (time s, power W) of the last sampled measurement
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: SensorError | None = None
        self._t0 = 0.0
        self._e0 = 0.0

    def start(self) -> None:
        """Begin measuring; raises SensorError if the sensor cannot be read, RuntimeError if running."""
        if self._thread is not None:
            raise RuntimeError("EnergyMeter already started")
        self._stop.clear()
        self._error = None
        if self.sensor.has_counter:
            self._e0 = self.sensor.energy_j()
            self._t0 = self.clock()
            tick, every = self._keepalive, self.keepalive_s
        else:
            self._t0 = self.clock()
            self.samples = [(self._t0, self.sensor.power_w())]
            tick, every = self._sample, self.interval_s
        self._thread = threading.Thread(target=self._run, args=(tick, every), name="energy-meter", daemon=True)
        self._thread.start()

    def stop(self) -> Reading:
        """End the measurement and return its reading; raises SensorError from any read."""
        if self._thread is None:
            raise RuntimeError("EnergyMeter not started")
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        if self.sensor.has_counter:
            joules = self.sensor.energy_j() - self._e0
            t1 = self.clock()
        else:
            t1 = self.clock()
            self.samples.append((t1, self.sensor.power_w()))
            joules = trapezoid(self.samples)
        return _reading(joules, t1 - self._t0, self.sensor.name)

    @contextmanager
    def measure(self) -> Iterator[Measurement]:
        """`with meter.measure() as m: work()`, then m.joules, m.watts, ... (m.reading)."""
        measurement = Measurement()
        self.start()
        try:
            yield measurement
        except BaseException:
            self._stop.set()  # the work failed: end the thread, keep the work's exception
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            raise
        measurement._reading = self.stop()

    def _run(self, tick: Callable[[], None], every: float) -> None:
        while not self._stop.wait(every):
            try:
                tick()
            except SensorError as e:
                self._error = e
                return

    def _sample(self) -> None:
        t = self.clock()
        self.samples.append((t, self.sensor.power_w()))

    def _keepalive(self) -> None:
        self.sensor.energy_j()


def trapezoid(samples: Sequence[tuple[float, float]]) -> float:
    """Integral (J) of (time s, power W) samples, in time order, by the trapezoid rule."""
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in pairwise(samples))


class PowerGauge:
    """Average power since the last reading, for telemetry: a counter sensor's energy difference over
    the time between two calls, or a power-only sensor's instantaneous reading. None when the sensor
    cannot be read now, or for a counter's first call (there is no interval yet)."""

    def __init__(self, sensor: PowerSensor, clock: Callable[[], float] = time.perf_counter) -> None:
        self.sensor, self.clock = sensor, clock
        self._last: tuple[float, float] | None = None  # (time s, counter J)

    def read(self) -> float | None:
        try:
            if not self.sensor.has_counter:
                return self.sensor.power_w()
            now, joules = self.clock(), self.sensor.energy_j()
        except SensorError as exc:
            log.warning("power sensor %s unreadable for telemetry: %s", self.sensor.name, exc)
            self._last = None
            return None
        last, self._last = self._last, (now, joules)
        if last is None or now <= last[0] or joules < last[1]:
            return None
        return (joules - last[1]) / (now - last[0])
