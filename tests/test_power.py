"""Power sensors on fake sysfs trees in the kernel's own layouts, and NVML through a fake library.

The trees copy the real ones: /sys/class/powercap entries are symlinks into
/sys/devices/virtual/powercap, attribute files end with the newline the kernel writes, and the
driver directories hold what the kernel puts beside the devices (bind, uevent, module).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from edge_agent import power_sensors
from edge_agent.power import SENSORS, PowerSensor, SensorError, detect, sensor_class
from edge_agent.power_meter import EnergyMeter, Reading, estimated, trapezoid
from edge_agent.power_sensors import Ina3221Sensor, NvmlSensor, RaplSensor

RAPL_RANGE_UJ = 262143328850  # max_energy_range_uj of many Intel packages


def write(path: Path, value: object) -> None:
    """An attribute as the kernel shows it; replaced atomically (a sampler may be reading it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def rapl_zone(root: Path, chain: list[str], name: str, energy_uj: int, range_uj: int = RAPL_RANGE_UJ) -> Path:
    """A zone in devices/virtual/powercap/<chain...>, linked flat from class/powercap like the kernel."""
    zone = root / "sys/devices/virtual/powercap" / "/".join(chain)
    write(zone / "name", name)
    write(zone / "energy_uj", energy_uj)
    write(zone / "max_energy_range_uj", range_uj)
    write(zone / "enabled", 1)
    write(zone / "constraint_0_name", "long_term")
    link = root / "sys/class/powercap" / chain[-1]
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(zone)
    return zone


def rapl_tree(root: Path) -> dict[str, Path]:
    """Two sockets with sub-zones, a psys zone and the MMIO view of package 0 (none of which count)."""
    write(root / "sys/devices/virtual/powercap/intel-rapl/enabled", 1)
    (root / "sys/class/powercap").mkdir(parents=True, exist_ok=True)
    (root / "sys/class/powercap/intel-rapl").symlink_to(root / "sys/devices/virtual/powercap/intel-rapl")
    return {
        "pkg0": rapl_zone(root, ["intel-rapl", "intel-rapl:0"], "package-0", 1_000_000),
        "core0": rapl_zone(root, ["intel-rapl", "intel-rapl:0", "intel-rapl:0:0"], "core", 400_000),
        "dram0": rapl_zone(root, ["intel-rapl", "intel-rapl:0", "intel-rapl:0:1"], "dram", 300_000),
        "pkg1": rapl_zone(root, ["intel-rapl", "intel-rapl:1"], "package-1", 2_000_000),
        "psys": rapl_zone(root, ["intel-rapl", "intel-rapl:2"], "psys", 9_000_000),
        "mmio": rapl_zone(root, ["intel-rapl-mmio", "intel-rapl-mmio:0"], "package-0", 1_000_000),
    }


def ina3221_chip(root: Path, dev: str, hwmon: str, channels: dict[int, tuple[str, int, int]]) -> Path:
    """Mainline hwmon driver: channel -> (label, bus mV, current mA); in4-in7 are shunt voltages."""
    driver = root / "sys/bus/i2c/drivers/ina3221"
    device = root / "sys/devices/platform/bus@0/c240000.i2c/i2c-1" / dev
    device.mkdir(parents=True)
    (root / "sys/module/ina3221").mkdir(parents=True, exist_ok=True)
    driver.mkdir(parents=True, exist_ok=True)
    for name in ("bind", "unbind", "uevent"):
        (driver / name).touch()
    if not (driver / "module").exists():
        (driver / "module").symlink_to(root / "sys/module/ina3221")
    (driver / dev).symlink_to(device)  # the driver lists its devices as links, like sysfs
    d = device / "hwmon" / hwmon
    write(d / "name", "ina3221")
    write(d / "update_interval", 1)
    for n, (label, mv, ma) in channels.items():
        write(d / f"in{n}_label", label)
        write(d / f"in{n}_input", mv)
        write(d / f"curr{n}_input", ma)
        write(d / f"in{n}_enable", 1)
        write(d / f"shunt{n}_resistor", 5000)
        write(d / f"in{n + 3}_input", 6440)  # shunt voltage (uV): no current of its own
    write(d / "in7_label", "sum of shunt voltages")
    write(d / "in7_input", 9000)
    return d


# -- RAPL ---------------------------------------------------------------------------------------


def test_rapl_sums_packages_not_subzones_psys_or_mmio(tmp_path: Path) -> None:
    zones = rapl_tree(tmp_path)
    [sensor] = detect(tmp_path)
    assert isinstance(sensor, RaplSensor) and sensor.has_counter
    assert sensor.name == "rapl:package-0+package-1"
    assert sensor.energy_j() == pytest.approx(3.0)  # 1 + 2 J, sub-zones inside their packages
    write(zones["pkg0"] / "energy_uj", 1_500_000)
    write(zones["pkg1"] / "energy_uj", 2_250_000)
    for other in ("core0", "dram0", "psys", "mmio"):
        write(zones[other] / "energy_uj", 50_000_000)
    assert sensor.energy_j() == pytest.approx(3.75)


def test_rapl_counter_wraps_at_its_range(tmp_path: Path) -> None:
    zone = rapl_zone(tmp_path, ["intel-rapl", "intel-rapl:0"], "package-0", RAPL_RANGE_UJ - 1000)
    sensor = RaplSensor([zone])
    before = sensor.energy_j()
    write(zone / "energy_uj", 500)  # past the top: 1000 uJ to the wrap, 500 after it
    assert sensor.energy_j() - before == pytest.approx(1500e-6)
    write(zone / "energy_uj", 2500)
    assert sensor.energy_j() - before == pytest.approx(3500e-6)


def test_meter_on_a_counter_is_its_difference(tmp_path: Path) -> None:
    zone = rapl_zone(tmp_path, ["intel-rapl", "intel-rapl:0"], "package-0", 7_000_000)
    meter = EnergyMeter(RaplSensor([zone]))
    with meter.measure() as m:
        time.sleep(0.01)
        write(zone / "energy_uj", 7_450_000)
    assert m.joules == pytest.approx(0.45)
    assert m.seconds >= 0.01 and m.watts == pytest.approx(m.joules / m.seconds)
    assert m.sensor == "rapl:package-0" and not m.reading.estimated
    assert meter.samples == []  # a counter is read at start and stop, not sampled


# -- INA3221 ------------------------------------------------------------------------------------


def test_ina3221_uses_vdd_in_when_labelled(tmp_path: Path) -> None:
    # Jetson Orin Nano / Xavier NX: one chip at 1-0040, the module input on channel 1.
    rails = {1: ("VDD_IN", 5072, 1264), 2: ("VDD_CPU_GPU_CV", 5064, 320), 3: ("VDD_SOC", 5064, 560)}
    ina3221_chip(tmp_path, "1-0040", "hwmon3", rails)
    [sensor] = detect(tmp_path)
    assert isinstance(sensor, Ina3221Sensor) and not sensor.has_counter
    assert sensor.name == "ina3221:VDD_IN"
    assert sensor.power_w() == pytest.approx(5.072 * 1.264)  # mV x mA = uW


def test_ina3221_sums_rails_without_vdd_in_and_skips_nc(tmp_path: Path) -> None:
    # Jetson AGX Orin: two chips, no module input rail, unconnected channels labelled NC, and a
    # channel switched off through in3_enable.
    ina3221_chip(
        tmp_path,
        "1-0040",
        "hwmon1",
        {1: ("VDD_GPU_SOC", 19_000, 1000), 2: ("VDD_CPU_CV", 19_000, 500), 3: ("VIN_SYS_5V0", 5000, 800)},
    )
    second = ina3221_chip(
        tmp_path, "1-0041", "hwmon2", {1: ("NC", 4000, 9999), 2: ("VDDQ_VDD2_1V8AO", 5000, 200), 3: ("OFF", 1, 1)}
    )
    write(second / "in3_enable", 0)  # a disabled channel: its reads fail with ENODATA
    (second / "curr3_input").unlink()
    [sensor] = detect(tmp_path)
    assert sensor.name == "ina3221:VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO"
    assert sensor.power_w() == pytest.approx(19.0 + 9.5 + 4.0 + 1.0)


def test_ina3221x_iio_layout_of_jetpack_4(tmp_path: Path) -> None:
    # Jetson Nano on L4T 32: NVIDIA's iio driver, 0-based channels, power in mW.
    iio = tmp_path / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for n, (rail, mw) in enumerate([("POM_5V_IN", 2472), ("POM_5V_GPU", 39), ("POM_5V_CPU", 513)]):
        write(iio / f"rail_name_{n}", rail)
        write(iio / f"in_power{n}_input", mw)
        write(iio / f"in_voltage{n}_input", 5016)
        write(iio / f"in_current{n}_input", mw * 1000 // 5016)
    [sensor] = detect(tmp_path)
    assert sensor.name == "ina3221:POM_5V_IN"
    assert sensor.power_w() == pytest.approx(2.472)


def test_power_only_meter_integrates_constant_power_without_busy_loop(tmp_path: Path) -> None:
    ina3221_chip(tmp_path, "1-0040", "hwmon0", {1: ("VDD_IN", 5000, 400)})  # 2 W
    [sensor] = detect(tmp_path)
    meter = EnergyMeter(sensor, interval_s=0.02)
    cpu0 = time.process_time()
    with meter.measure() as m:
        time.sleep(0.3)
    cpu = time.process_time() - cpu0
    assert m.seconds >= 0.3
    assert m.joules == pytest.approx(2.0 * m.seconds, rel=1e-9)
    assert m.watts == pytest.approx(2.0)
    assert 5 <= len(meter.samples) <= m.seconds / 0.02 + 3  # a sample every 20 ms, not a spin
    assert cpu < 0.1, f"sampling used {cpu:.3f} s of CPU in 0.3 s"


def test_power_only_meter_follows_changing_power(tmp_path: Path) -> None:
    chip = ina3221_chip(tmp_path, "1-0040", "hwmon0", {1: ("VDD_IN", 5000, 400)})  # 2 W
    meter = EnergyMeter(Ina3221Sensor.discover(tmp_path)[0], interval_s=0.01)
    with meter.measure() as m:
        time.sleep(0.15)
        t_switch = time.perf_counter()
        write(chip / "curr1_input", 1200)  # 6 W
        time.sleep(0.15)
    times = [t for t, _ in meter.samples]
    t_start, t_stop = times[0], times[-1]
    expected = 2.0 * (t_switch - t_start) + 6.0 * (t_stop - t_switch)
    # The switch lands between two samples: the trapezoid there is off by at most 4 W x their gap
    # (about the 10 ms interval, longer on a loaded host).
    gap = min(b for b in times if b >= t_switch) - max(a for a in times if a <= t_switch)
    assert m.joules == pytest.approx(expected, abs=4.0 * gap + 1e-3)
    assert m.seconds == pytest.approx(t_stop - t_start)
    assert {round(p, 6) for _, p in meter.samples} == {2.0, 6.0}


def test_a_read_failing_while_sampling_is_raised_by_stop(tmp_path: Path) -> None:
    chip = ina3221_chip(tmp_path, "1-0040", "hwmon0", {1: ("VDD_IN", 5000, 400)})
    meter = EnergyMeter(Ina3221Sensor.discover(tmp_path)[0], interval_s=0.005)
    meter.start()
    write(chip / "curr1_input", "garbage")
    time.sleep(0.05)
    with pytest.raises(SensorError, match=r"curr1_input: not an integer: 'garbage'"):
        meter.stop()


def test_trapezoid() -> None:
    assert trapezoid([(0.0, 1.0), (1.0, 3.0), (3.0, 3.0)]) == pytest.approx(2.0 + 6.0)
    assert trapezoid([(5.0, 9.0)]) == 0.0


# -- Errors -------------------------------------------------------------------------------------


def test_garbage_directory_and_negative_values_are_clear_errors(tmp_path: Path) -> None:
    zone = rapl_zone(tmp_path, ["intel-rapl", "intel-rapl:0"], "package-0", 1)
    energy = zone / "energy_uj"
    for contents, problem in [("12ab", "not an integer: '12ab'"), ("-5", "negative energy: -5 uJ")]:
        write(energy, contents)
        with pytest.raises(SensorError, match=f"energy_uj: {problem}") as err:
            RaplSensor([zone])
        assert err.value.path == str(energy)
        assert detect(tmp_path) == []  # detect leaves out what it cannot read
    energy.unlink()
    energy.mkdir()  # fails for root too
    with pytest.raises(SensorError, match=r"intel-rapl:0/energy_uj: cannot read \(Is a directory\)"):
        RaplSensor([zone])
    shutil.rmtree(energy)
    with pytest.raises(SensorError, match=r"energy_uj: cannot read \(No such file or directory\)"):
        RaplSensor([zone])
    assert isinstance(SensorError("x", "y"), OSError) and str(SensorError("/a/b", "bad")) == "/a/b: bad"


_UNPRIVILEGED_READ = """
import os, sys
from pathlib import Path
from edge_agent.power import SensorError, detect
from edge_agent.power_sensors import RaplSensor
try:  # started as root (the interpreter may live where nobody can read), then become nobody
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
except PermissionError as e:
    print(e)
    sys.exit(77)
root = Path(sys.argv[1])
assert detect(root) == [], "detect must skip an unreadable sensor"
try:
    RaplSensor([root / "sys/class/powercap/intel-rapl:0"])
except SensorError as e:
    print(e)
"""


def test_unreadable_energy_uj_says_run_as_root() -> None:
    # The kernel makes energy_uj 0400 root. Root reads any file, so as root the check runs in a
    # child process that becomes nobody (uid 65534); otherwise the file is simply chmod 000.
    root = Path(tempfile.mkdtemp())
    try:
        root.chmod(0o755)
        rapl_zone(root, ["intel-rapl", "intel-rapl:0"], "package-0", 1000)
        energy = root / "sys/class/powercap/intel-rapl:0/energy_uj"  # the error names the path as given
        if os.geteuid() != 0:
            energy.chmod(0o000)
            assert detect(root) == []
            with pytest.raises(SensorError) as err:
                RaplSensor([root / "sys/class/powercap/intel-rapl:0"])
            message = str(err.value)
        else:
            energy.chmod(0o400)
            repo = Path(__file__).resolve().parents[1]
            run = subprocess.run(
                [sys.executable, "-c", _UNPRIVILEGED_READ, str(root)],
                cwd=repo,
                env={**os.environ, "PYTHONPATH": str(repo)},
                capture_output=True,
                text=True,
                timeout=60,
            )
            if run.returncode == 77:
                pytest.skip(f"cannot become an unprivileged user here: {run.stdout.strip()}")
            assert run.returncode == 0, run.stderr
            message = run.stdout.strip()
        assert message == f"{energy}: cannot read (Permission denied): run as root or grant read access"
    finally:
        shutil.rmtree(root)


# -- NVML ---------------------------------------------------------------------------------------

NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED


class FakeNvml:
    """libnvidia-ml.so.1's functions as ctypes calls them: return codes, results through pointers."""

    def __init__(self, gpus: int = 1, energy_mj: int | None = 5_000, power_mw: int = 71_500) -> None:
        self.gpus = gpus
        self.energy_mj = energy_mj  # None: a GPU before Volta
        self.power_mw = power_mw
        self.inits = 0

    def nvmlInit_v2(self) -> int:
        self.inits += 1
        return 0

    def nvmlShutdown(self) -> int:
        self.inits -= 1
        return 0

    def nvmlErrorString(self, rc: int) -> bytes:
        return {NOT_SUPPORTED: b"Not Supported"}.get(rc, b"Unknown Error")

    def nvmlDeviceGetCount_v2(self, count: ctypes._Pointer[ctypes.c_uint]) -> int:
        count.contents.value = self.gpus
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index: ctypes.c_uint, handle: ctypes._Pointer[ctypes.c_void_p]) -> int:
        assert self.inits > 0, "nvmlInit_v2 first"
        handle.contents.value = 0x1000 + index.value
        return 0

    def nvmlDeviceGetTotalEnergyConsumption(
        self, handle: ctypes.c_void_p, energy: ctypes._Pointer[ctypes.c_ulonglong]
    ) -> int:
        assert handle.value is not None and handle.value >= 0x1000
        if self.energy_mj is None:
            return NOT_SUPPORTED
        energy.contents.value = self.energy_mj
        return 0

    def nvmlDeviceGetPowerUsage(self, handle: ctypes.c_void_p, power: ctypes._Pointer[ctypes.c_uint]) -> int:
        assert handle.value is not None and handle.value >= 0x1000
        power.contents.value = self.power_mw
        return 0


def test_nvml_energy_counter() -> None:
    lib = FakeNvml(energy_mj=5_000)
    sensor = NvmlSensor(0, lib=lib)
    assert sensor.has_counter and sensor.name == "nvml:0"
    assert sensor.energy_j() == pytest.approx(5.0)
    assert sensor.power_w() == pytest.approx(71.5)
    meter = EnergyMeter(sensor)
    with meter.measure() as m:
        lib.energy_mj += 1_250
    assert m.joules == pytest.approx(1.25) and m.sensor == "nvml:0"


def test_nvml_falls_back_to_power_before_volta() -> None:
    lib = FakeNvml(energy_mj=None, power_mw=40_000)
    sensor = NvmlSensor(0, lib=lib)
    assert not sensor.has_counter
    assert sensor.power_w() == pytest.approx(40.0)
    with pytest.raises(SensorError, match="nvmlDeviceGetTotalEnergyConsumption failed: Not Supported"):
        sensor.energy_j()
    with EnergyMeter(sensor, interval_s=0.01).measure() as m:
        time.sleep(0.05)
    assert m.joules == pytest.approx(40.0 * m.seconds)


def test_nvml_discovery_and_absent_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = FakeNvml(gpus=2)
    assert [s.name for s in NvmlSensor.discover(Path("/"), lib=lib)] == ["nvml:0", "nvml:1"]
    monkeypatch.setattr(power_sensors, "load_nvml", lambda: lib)
    assert [s.name for s in detect(Path("/")) if s.kind == "nvml"] == ["nvml:0", "nvml:1"]
    assert NvmlSensor.discover(tmp_path) == []  # a fake tree has no GPU
    monkeypatch.setattr(power_sensors, "load_nvml", lambda: None)
    assert NvmlSensor.discover(Path("/")) == []
    with pytest.raises(SensorError, match=r"libnvidia-ml\.so\.1: not found"):
        NvmlSensor(0)


# -- Detection, registry, estimates --------------------------------------------------------------


def test_detect_on_an_empty_root(tmp_path: Path) -> None:
    assert detect(tmp_path) == []


def test_detect_on_this_machine() -> None:
    sensors = detect()
    assert isinstance(sensors, list) and all(isinstance(s, PowerSensor) for s in sensors)


def test_registry_names_every_kind() -> None:
    for kind in SENSORS:
        cls = sensor_class(kind)
        assert issubclass(cls, PowerSensor) and cls.kind == kind
    with pytest.raises(ValueError, match="unknown power sensor 'battery'"):
        sensor_class("battery")


def test_estimated_reading() -> None:
    r = estimated(7.5, 2.0)
    assert r == Reading(joules=15.0, seconds=2.0, watts=7.5, sensor="") and r.estimated
    with pytest.raises(ValueError):
        estimated(-1.0, 1.0)


def test_measurement_is_read_after_the_block(tmp_path: Path) -> None:
    zone = rapl_zone(tmp_path, ["intel-rapl", "intel-rapl:0"], "package-0", 0)
    meter = EnergyMeter(RaplSensor([zone]))
    with meter.measure() as m:
        with pytest.raises(RuntimeError, match="still measuring"):
            _ = m.joules
        with pytest.raises(RuntimeError, match="already started"):
            meter.start()
    with pytest.raises(RuntimeError, match="not started"):
        meter.stop()
