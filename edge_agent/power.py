"""Power sensors of the machine the agent runs on: the interface every kind implements, and their registry.

Units: energy in joules (J), power in watts (W), time in seconds (s) from `time.perf_counter`.
The kernel files give microjoules (RAPL), millivolts and milliamperes (INA3221 hwmon) or
milliwatts (INA3221 iio); NVML gives millijoules and milliwatts. Every reader converts at once.

A `PowerSensor` either reads a cumulative energy counter (`has_counter`: RAPL, NVML on Volta and
later) or only instantaneous power (INA3221 rails, NVML before Volta). `detect(root)` lists what
this machine exposes and can read. Kinds are named in `SENSORS` ("module:Class") and imported only
when asked for, so this module imports none of them.

Where the rest lives: the kinds themselves and the kernel and NVML formats they read in
edge_agent.power_sensors; the `EnergyMeter` that measures a block of work with any sensor, the
`estimated` reading to report when nothing can be read, and the telemetry `PowerGauge` in
edge_agent.power_meter. Both import this module; it imports neither.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

SENSORS: dict[str, str] = {
    "rapl": "edge_agent.power_sensors:RaplSensor",
    "ina3221": "edge_agent.power_sensors:Ina3221Sensor",
    "nvml": "edge_agent.power_sensors:NvmlSensor",
}
"""Sensor kind -> "module:Class", imported when used; `detect` asks each in this order."""


class SensorError(OSError):
    """A sensor file or call that cannot be read as expected; the message starts with the file."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def read_text(path: Path) -> str:
    """The file's contents; raises SensorError saying why it cannot be read."""
    try:
        return path.read_text()
    except PermissionError as e:
        raise SensorError(path, f"cannot read ({e.strerror}): run as root or grant read access") from e
    except OSError as e:
        raise SensorError(path, f"cannot read ({e.strerror or e})") from e


def read_int(path: Path) -> int:
    """The integer a sysfs attribute holds (the kernel writes it with a trailing newline)."""
    text = read_text(path).strip()
    try:
        return int(text)
    except ValueError:
        raise SensorError(path, f"not an integer: {text[:40]!r}") from None


class PowerSensor(ABC):
    """One power or energy source; constructing one reads it once (SensorError if it cannot)."""

    kind: ClassVar[str]
    """Its name in SENSORS."""
    name: str
    """What it measures, for a Reading: "rapl:package-0", "ina3221:VDD_IN", "nvml:0"."""
    has_counter: bool
    """True: energy_j() reads a hardware counter; False: only power_w(), to be sampled."""

    @classmethod
    @abstractmethod
    def discover(cls, root: Path) -> list[PowerSensor]:
        """This kind's sensors under `root` (the machine's "/"); those that cannot be read are left out."""

    def energy_j(self) -> float:
        """Cumulative energy (J), monotonically increasing, wraps of the counter included."""
        raise NotImplementedError(f"{self.name} gives power only: measure it with EnergyMeter")

    def power_w(self) -> float:
        """Instantaneous power (W)."""
        raise NotImplementedError(f"{self.name} gives an energy counter only")


def sensor_class(kind: str) -> type[PowerSensor]:
    """The class SENSORS names for `kind`; raises ValueError for an unknown kind."""
    if kind not in SENSORS:
        raise ValueError(f"unknown power sensor {kind!r}; known: {', '.join(sorted(SENSORS))}")
    module, _, cls = SENSORS[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


def detect(root: Path = Path("/")) -> list[PowerSensor]:
    """Every sensor this machine exposes and can read, in SENSORS order; [] when none."""
    return [sensor for kind in SENSORS for sensor in sensor_class(kind).discover(root)]
