"""Tandem device profiles: one YAML file per device class, and a strict loader.

A profile states what the cost model needs to predict a request's latency and energy on a device:
memory size and bandwidth, dense compute, power, the backends it runs, its typical link to the hub,
and how much of the peak figures an inference runtime reaches in practice.

    profile = load_profile("jetson-orin-nano")          # a shipped profile, by name
    profile = load_profile("site/my-board.yaml")        # or any file

The loader is strict: an unknown key, a missing key, a wrong type, a negative number or an unknown
profile name raises `ProfileError` naming the file and the field. Units are SI: GB = 10**9 bytes,
GB/s = 10**9 bytes per second, TFLOPS = 10**12 floating-point operations per second, Mbps = 10**6 bits
per second.
"""

from __future__ import annotations

import functools
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from device_profiles.calibration import Calibration, CalibrationError, Sample

__all__ = [
    "BACKENDS",
    "Calibration",
    "CalibrationError",
    "DeviceProfile",
    "Efficiency",
    "LinkSpec",
    "ProfileError",
    "Sample",
    "all_profiles",
    "list_profiles",
    "load_profile",
]

BACKENDS = frozenset({"torch", "onnxruntime", "tensorrt", "cuda"})
"""Inference backends a profile may list."""

_T = TypeVar("_T")


class ProfileError(ValueError):
    """A device or link profile is missing, unreadable, or breaks the schema; the message names file and field."""


def _require(obj: object, bound: str, *names: str) -> None:
    """Raise ProfileError unless each named numeric field of `obj` is finite and meets `bound`."""
    for name in names:
        value = getattr(obj, name)
        ok = math.isfinite(value) and (value > 0 if bound == "> 0" else value >= 0)
        if not ok:
            raise ProfileError(f"{name} must be finite and {bound}, got {value!r}")


@dataclass(frozen=True)
class LinkSpec:
    """The device's typical network link to the hub."""

    rtt_ms: float
    """Round-trip time to the hub, milliseconds."""
    uplink_mbps: float
    """Device-to-hub throughput, megabits per second."""
    downlink_mbps: float
    """Hub-to-device throughput, megabits per second."""

    def __post_init__(self) -> None:
        _require(self, ">= 0", "rtt_ms")
        _require(self, "> 0", "uplink_mbps", "downlink_mbps")


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the peak figures that an inference runtime reaches on this device."""

    prefill: float = 0.5
    """Fraction of `compute_tflops` reached by prefill (and any compute-bound step), in (0, 1]."""
    decode: float = 0.6
    """Fraction of `memory_bandwidth_gbs` reached by memory-bound decoding, in (0, 1]."""

    def __post_init__(self) -> None:
        for name in ("prefill", "decode"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ProfileError(f"{name} must be in (0, 1], got {value!r}")


@dataclass(frozen=True)
class DeviceProfile:
    """One device class, as the cost model sees it."""

    name: str
    """Profile name; a shipped profile's name equals its file name without `.yaml`."""
    description: str
    """One line saying which hardware and configuration the numbers describe."""
    kind: Literal["edge", "cloud"]
    """"edge" for devices whose energy the router budgets, "cloud" for the hub's own servers."""
    memory_gb: float
    """Memory available to the model (unified RAM, or GPU memory), 10**9 bytes."""
    memory_bandwidth_gbs: float
    """Memory bandwidth (spec-sheet peak, or measured where stated), 10**9 bytes per second."""
    compute_tflops: float
    """Dense peak compute for the dtype this device runs models in, 10**12 FLOP per second."""
    power_active_w: float
    """Whole-device power while running inference, watts."""
    power_idle_w: float
    """Whole-device power while idle, watts."""
    backends: tuple[str, ...]
    """Inference backends available on the device, each one of BACKENDS."""
    link: LinkSpec
    """Typical link to the hub."""
    efficiency: Efficiency = Efficiency()
    """Fractions of peak compute and bandwidth reached in practice (calibrated by measurement)."""
    calibrations: tuple[Calibration, ...] = ()
    """What `tandem profile` measured on this device, one entry per (model, quant, engine)."""
    quant: str = "source"
    """Precision an agent of this class serves its model at by default (`tandem agent run --quant`):
    one of models.runtime.QUANTS, "source" (each tensor at its GGUF's own precision), "fp32", "int8" or "int4"."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ProfileError("name must not be empty")
        if self.quant not in ("source", "fp32", "int8", "int4"):  # models.runtime.QUANTS (models not imported here)
            raise ProfileError(f"quant must be one of ['source', 'fp32', 'int8', 'int4'], got {self.quant!r}")
        if self.kind not in ("edge", "cloud"):
            raise ProfileError(f"kind must be 'edge' or 'cloud', got {self.kind!r}")
        _require(self, "> 0", "memory_gb", "memory_bandwidth_gbs", "compute_tflops", "power_active_w")
        _require(self, ">= 0", "power_idle_w")
        if not self.backends:
            raise ProfileError("backends must list at least one backend")
        unknown = sorted(set(self.backends) - BACKENDS)
        if unknown:
            raise ProfileError(f"backends: unknown {unknown}; known: {sorted(BACKENDS)}")
        keys = [c.key for c in self.calibrations]
        if len(set(keys)) != len(keys):
            raise ProfileError("calibrations: two entries for the same (model, quant, engine)")

    def calibration_for(self, model: str, quant: str, engine: str) -> Calibration | None:
        """The calibration measured for `model` at `quant` on `engine`, or None if this profile has no
        calibrations at all (a shipped, uncalibrated profile). Raises ProfileError when it has some but
        none for this model, precision and engine: a profile measured for another model or engine
        must not pass for this one."""
        if not self.calibrations:
            return None
        for c in self.calibrations:
            if c.key == (model, quant, engine):
                return c
        have = ", ".join(f"{m} ({q}, {e})" for m, q, e in (c.key for c in self.calibrations))
        raise ProfileError(
            f"calibrations: profile {self.name!r} was measured for {have}, not {model} ({quant}, {engine}); "
            f"run `tandem profile --model {model}` on this device"
        )


# -- strict construction from plain data -------------------------------------------------------------


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp` and convert it (lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union) and type(None) in typing.get_args(tp):
        if value is None:  # `X | None`: YAML's null (or `~`) is the explicit "not known"
            return None
        (inner,) = (a for a in typing.get_args(tp) if a is not type(None))
        return _convert(value, inner, where)
    if is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ProfileError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ProfileError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ProfileError(f"{where}: expected a list, got {type(value).__name__}")
        item_tp = typing.get_args(tp)[0]
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        # bool is an int subclass; `true` where a number belongs is a mistake, not 1.0.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProfileError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ProfileError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{where}: annotation {tp!r} has no converter")  # a bug in this module, not in the file


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown and missing keys; `prefix` dots nested fields."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ProfileError(f"{prefix}{unknown[0]}: unknown key; known keys: {sorted(known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ProfileError(f"{prefix}{name}: missing required key")
            continue
        kwargs[name] = _convert(data[name], hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except (ProfileError, CalibrationError) as exc:  # range checks in __post_init__ name the bare field
        raise ProfileError(f"{prefix}{exc}") from None


def profile_from_dict(data: Mapping[str, Any]) -> DeviceProfile:
    """Build a DeviceProfile from plain data with the loader's checks. Raises ProfileError."""
    return _build(DeviceProfile, data)


# -- files ----------------------------------------------------------------------------------------------


def _shipped(folder: str = "") -> dict[str, Traversable]:
    """Shipped profile files by name: device profiles, or those in the package's subfolder `folder`."""
    root = resources.files(__name__)
    if folder:
        root = root.joinpath(folder)
    return {p.name.removesuffix(".yaml"): p for p in root.iterdir() if p.name.endswith(".yaml")}


def _path_of(name_or_path: str | os.PathLike[str]) -> Path | None:
    """The argument as a file path, or None when it names a shipped profile: an existing file, a name ending
    in `.yaml`/`.yml`, or one containing a path separator is a path."""
    arg = os.fspath(name_or_path)
    path = Path(arg)
    if path.is_file() or path.suffix in (".yaml", ".yml") or os.sep in arg or "/" in arg:
        return path
    return None


def _read(path: Path, what: str) -> str:
    """The text of `path`; ProfileError naming the file (and `what` it should hold) if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None


def _parse(text: str, source: str, build: Callable[[Mapping[str, Any]], _T]) -> _T:
    """Parse YAML `text` into what `build` makes of its mapping; errors are prefixed with `source`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ProfileError(f"{source}: expected a mapping of profile fields, got {type(data).__name__}")
    try:
        return build(data)
    except ProfileError as exc:
        raise ProfileError(f"{source}: {exc}") from None


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load a shipped profile by name (e.g. "raspberry-pi-5") or any profile file by path.

    An argument naming an existing file, or ending in `.yaml`/`.yml`, or containing a path separator, is
    a path; anything else is a shipped profile name. Raises ProfileError for an unknown name, a file that
    cannot be read, or contents that break the schema; the message names the file and the field.
    """
    path = _path_of(name_or_path)
    if path is not None:
        return _parse(_read(path, "device profile"), str(path), profile_from_dict)
    return _load_shipped(os.fspath(name_or_path))


@functools.lru_cache(maxsize=64)
def _load_shipped(name: str) -> DeviceProfile:
    """Shipped profiles are package data and never change at run time: parse each once (the hub's
    router asks for them on every request). Profiles are frozen, so sharing one is safe."""
    shipped = _shipped()
    if name not in shipped:
        raise ProfileError(f"unknown device profile {name!r}; shipped profiles: {', '.join(sorted(shipped))}")
    return _parse(shipped[name].read_text(encoding="utf-8"), f"device_profiles/{name}.yaml", profile_from_dict)


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(_shipped())


def all_profiles() -> dict[str, DeviceProfile]:
    """Every shipped profile by name. Raises ProfileError if any of them is invalid."""
    return {name: load_profile(name) for name in list_profiles()}
