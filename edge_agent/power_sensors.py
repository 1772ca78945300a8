"""The power sensor kinds SENSORS names (edge_agent.power): RAPL, INA3221 and NVML readers.

Each is a `PowerSensor` (edge_agent.power) found by its `discover(root)`; a sensor that cannot be
read is left out and the reason logged (the reason is the fix, e.g. run as root). Kept apart from
the registry so that edge_agent.power stays the small contract a new kind implements, and apart
from the meter (edge_agent.power_meter), which works with any kind.

The formats, as verified against public sources:
- RAPL (`<root>/sys/class/powercap`): zones `intel-rapl:N` (packages, `name` "package-N") with
  sub-zones `intel-rapl:N:M` (core, uncore, dram) counted inside their package; `energy_uj` wraps
  at `max_energy_range_uj`. Linux "Power Capping Framework" (docs.kernel.org/power/powercap/
  powercap.html). `energy_uj` is root-only (0400) since the CVE-2020-8694 fix (torvalds/linux
  949dd0104c49, see powercap/powercap#7 and mlco2/codecarbon#244). A top-level `psys` zone (whole
  platform, client Intel) and `intel-rapl-mmio:N` (the same package through MMIO) would count
  the packages twice, so only `package-*` zones are summed.
- INA3221 hwmon (`<root>/sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmonK/`): `in[123]_label`,
  `in[123]_input` bus voltage (mV), `curr[123]_input` current (mA); `in7` is the sum of shunt
  voltages and has no current. Linux "Kernel driver ina3221" (docs.kernel.org/hwmon/ina3221.html).
  On Jetson (JetPack 5+), unconnected channels are labelled "NC"; the module input is "VDD_IN"
  (Orin Nano/NX, Xavier NX), "POM_5V_IN" on the Nano, and absent on AGX Xavier/Orin
  (energymon/energymon jetson/ina3221.c and JetsonPowerRails.md; rbonghi/jetson_stats
  jtop/core/power.py).
- INA3221 iio, NVIDIA's L4T driver (JetPack 4: `<root>/sys/bus/i2c/drivers/ina3221x/<bus>-<addr>/
  iio:deviceK/`): `rail_name_[012]`, `in_power[012]_input` (mW) (energymon jetson/ina3221x.c).
- NVML (`libnvidia-ml.so.1`): nvmlDeviceGetTotalEnergyConsumption, mJ since the driver loaded,
  Volta and later; nvmlDeviceGetPowerUsage, mW (NVIDIA NVML API reference).
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.power import PowerSensor, SensorError, read_int, read_text

log = logging.getLogger("edge_agent.power")  # the logger these sensors used before the split

POWERCAP = Path("sys/class/powercap")
I2C_DRIVERS = Path("sys/bus/i2c/drivers")
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
"""INA3221 labels of the whole module's input, preferred over summing the rails."""
NVML_LIBRARY = "libnvidia-ml.so.1"
NVML_SUCCESS = 0

_PACKAGE_ZONE = re.compile(r"intel-rapl:\d+")  # top level only: sub-zones are intel-rapl:N:M


def _probe(kind: str, make: Callable[[], PowerSensor]) -> list[PowerSensor]:
    """[make()], or [] when it cannot be read (logged: the reason is the fix, e.g. run as root)."""
    try:
        return [make()]
    except SensorError as e:
        log.info("power sensor %s not used: %s", kind, e)
        return []


class RaplSensor(PowerSensor):
    """The sum of the RAPL package zones' counters (Intel, and AMD Zen on recent kernels)."""

    kind = "rapl"
    has_counter = True

    def __init__(self, zones: Sequence[Path]) -> None:
        """`zones`: package zone directories, e.g. /sys/class/powercap/intel-rapl:0."""
        if not zones:
            raise ValueError("RaplSensor needs at least one zone")
        self._energy = [zone / "energy_uj" for zone in zones]
        self._range = [read_int(zone / "max_energy_range_uj") for zone in zones]  # (uJ)
        self.name = "rapl:" + "+".join(read_text(zone / "name").strip() for zone in zones)
        self._lock = threading.Lock()  # the meter's keep-alive thread reads too
        self._last = [self._read(i) for i in range(len(zones))]  # raw counters (uJ)
        self._total_uj = sum(self._last)  # exact: Python ints

    @classmethod
    def discover(cls, root: Path) -> list[PowerSensor]:
        base = root / POWERCAP
        tops = [p for p in base.glob("intel-rapl:*") if _PACKAGE_ZONE.fullmatch(p.name)]
        if not tops:
            return []
        tops.sort(key=lambda p: int(p.name.rpartition(":")[2]))

        def make() -> RaplSensor:
            packages = [z for z in tops if read_text(z / "name").startswith("package-")]
            if not packages:
                raise SensorError(base, "no package zone (only " + ", ".join(z.name for z in tops) + ")")
            return cls(packages)

        return _probe(cls.kind, make)

    def _read(self, i: int) -> int:
        raw = read_int(self._energy[i])
        if raw < 0:
            raise SensorError(self._energy[i], f"negative energy: {raw} uJ")
        if raw > self._range[i]:
            raise SensorError(self._energy[i], f"energy {raw} uJ above max_energy_range_uj {self._range[i]}")
        return raw

    def energy_j(self) -> float:
        """Read at least once per wrap period (max_energy_range_uj / power: about 40 min at 100 W)."""
        with self._lock:
            for i in range(len(self._energy)):
                raw = self._read(i)
                delta = raw - self._last[i]
                if delta < 0:  # the counter wrapped past its range once
                    delta += self._range[i]
                self._total_uj += delta
                self._last[i] = raw
            return self._total_uj / 1e6


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: power (W) = the product of its files' integers x scale."""

    label: str
    """The rail's name, as the device tree labels it ("VDD_IN")."""
    files: tuple[Path, ...]
    """hwmon: (in{N}_input mV, curr{N}_input mA); iio: (in_power{N}_input mW,)."""
    scale: float
    """To watts: 1e-6 for mV x mA, 1e-3 for mW."""

    def watts(self) -> float:
        value = self.scale
        for f in self.files:
            value *= read_int(f)
        return value


def ina3221_rails(root: Path) -> list[Rail]:
    """Every labelled, connected INA3221 channel under root, hwmon (mainline) and iio (L4T) drivers."""
    rails = []
    for hwmon in sorted((root / I2C_DRIVERS / "ina3221").glob("*/hwmon/hwmon*")):
        for n in (1, 2, 3):  # in4..in7 are shunt voltages, with no current channel
            label_file = hwmon / f"in{n}_label"
            if not label_file.exists():  # the driver shows a label only for channels the DT names
                continue
            label = read_text(label_file).strip()
            enable = hwmon / f"in{n}_enable"  # a disabled channel's reads fail (ENODATA)
            if label == "NC" or (enable.exists() and read_text(enable).strip() == "0"):  # NC: no connection
                continue
            rails.append(Rail(label, (hwmon / f"in{n}_input", hwmon / f"curr{n}_input"), 1e-6))
    for iio in sorted((root / I2C_DRIVERS / "ina3221x").glob("*/iio:device*")):
        for name_file in sorted(iio.glob("rail_name_[0-9]")):
            n = name_file.name.rpartition("_")[2]
            rails.append(Rail(read_text(name_file).strip(), (iio / f"in_power{n}_input",), 1e-3))
    return rails


class Ina3221Sensor(PowerSensor):
    """Jetson power monitors: the module input rail (VDD_IN) when labelled, else the sum of the rails."""

    kind = "ina3221"
    has_counter = False

    def __init__(self, rails: Sequence[Rail]) -> None:
        if not rails:
            raise ValueError("Ina3221Sensor needs at least one rail")
        total = [r for r in rails if r.label in TOTAL_RAILS]
        # The input rail feeds the others: summing it with them would count them twice.
        self.rails = tuple(total[:1] or rails)
        self.name = "ina3221:" + "+".join(r.label for r in self.rails)
        self.power_w()

    @classmethod
    def discover(cls, root: Path) -> list[PowerSensor]:
        drivers = root / I2C_DRIVERS
        if not ((drivers / "ina3221").is_dir() or (drivers / "ina3221x").is_dir()):
            return []

        def make() -> Ina3221Sensor:
            rails = ina3221_rails(root)
            if not rails:
                raise SensorError(drivers, "no labelled INA3221 rail")
            return cls(rails)

        return _probe(cls.kind, make)

    def power_w(self) -> float:
        return sum(r.watts() for r in self.rails)


NvmlLibrary = Any
"""`ctypes.CDLL(NVML_LIBRARY)`, or an object with the same functions and calling convention."""


def load_nvml() -> NvmlLibrary | None:
    """The NVML library with its prototypes, or None when the driver is not installed."""
    try:
        lib = ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return None
    lib.nvmlErrorString.restype = ctypes.c_char_p
    lib.nvmlDeviceGetHandleByIndex_v2.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
    return lib


class NvmlSensor(PowerSensor):
    """One NVIDIA GPU: its energy counter (mJ, Volta+), else its power (mW)."""

    kind = "nvml"

    def __init__(self, index: int = 0, lib: NvmlLibrary | None = None) -> None:
        """Raises SensorError when the library is absent or the GPU cannot be read."""
        self._lib = lib if lib is not None else load_nvml()
        if self._lib is None:
            raise SensorError(NVML_LIBRARY, "not found: no NVIDIA driver")
        self._call("nvmlInit_v2")  # reference counted by NVML; held for the process's life
        self._handle = ctypes.c_void_p()
        self._call("nvmlDeviceGetHandleByIndex_v2", ctypes.c_uint(index), ctypes.pointer(self._handle))
        self.name = f"nvml:{index}"
        try:
            self.energy_j()
            self.has_counter = True
        except SensorError as e:  # before Volta, or not supported on this board
            log.info("%s: no energy counter (%s), sampling power", self.name, e.problem)
            self.has_counter = False
            self.power_w()

    @classmethod
    def discover(cls, root: Path, lib: NvmlLibrary | None = None) -> list[PowerSensor]:
        """GPUs of this machine: only for the real root (a fake sysfs tree has no GPU)."""
        if lib is None:
            if root.resolve() != Path("/"):
                return []
            lib = load_nvml()
            if lib is None:
                return []
        count = ctypes.c_uint(0)
        if (rc := lib.nvmlInit_v2()) != NVML_SUCCESS:
            log.info("power sensor nvml not used: nvmlInit_v2 returned %d", rc)
            return []
        try:
            if (rc := lib.nvmlDeviceGetCount_v2(ctypes.pointer(count))) != NVML_SUCCESS:
                log.info("power sensor nvml not used: nvmlDeviceGetCount_v2 returned %d", rc)
                return []
        finally:
            lib.nvmlShutdown()
        return [s for i in range(count.value) for s in _probe(cls.kind, lambda i=i: cls(i, lib))]

    def _call(self, fn: str, *args: Any) -> None:
        func = getattr(self._lib, fn, None)
        if func is None:
            raise SensorError(NVML_LIBRARY, f"{fn} missing: driver too old")
        rc = func(*args)
        if rc != NVML_SUCCESS:
            reason = self._lib.nvmlErrorString(rc)
            raise SensorError(NVML_LIBRARY, f"{fn} failed: {reason.decode() if reason else 'error'} ({rc})")

    def energy_j(self) -> float:
        energy = ctypes.c_ulonglong(0)  # (mJ) 64 bits: never wraps in practice
        self._call("nvmlDeviceGetTotalEnergyConsumption", self._handle, ctypes.pointer(energy))
        return energy.value / 1e3

    def power_w(self) -> float:
        power = ctypes.c_uint(0)  # (mW)
        self._call("nvmlDeviceGetPowerUsage", self._handle, ctypes.pointer(power))
        return power.value / 1e3
