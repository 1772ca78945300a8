"""The agent's dependency closure, pinned at the versions installed here, for one device platform.

The agent runs on the device with exactly the versions it was tested with on this machine: we
walk the `Requires-Dist` of the agent's wheel, recursively through the installed distributions
(importlib.metadata), evaluating each marker for the *device's* Python and architecture, and pin
every distribution reached at its installed version (`name==version`, local versions such as
torch's `+cpu` kept). Optional extras of the agent itself (dev, reference, ...) are never followed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

# Distributions that are the installer's business, never the agent's (pip's own lock files leave
# them out for the same reason); setuptools stays: torch imports it at run time.
_NEVER_PINNED = frozenset({"pip", "wheel"})


class LockError(Exception):
    """The closure cannot be pinned from this environment; the message says what to install."""


@dataclass(frozen=True)
class DevicePlatform:
    """What the wheelhouse is built for: the device's CPython, CPU architecture and C library."""

    python: str
    """The device's python3 as "X.Y", e.g. "3.11"."""
    machine: str
    """`uname -m`: "x86_64" or "aarch64"."""
    glibc: str = "2.28"
    """The device's glibc as "2.N" (`ldd --version`); manylinux wheels up to it are accepted."""

    def __post_init__(self) -> None:
        if self.machine not in ("x86_64", "aarch64"):
            raise LockError(f"architecture {self.machine!r}: only x86_64 and aarch64 devices are supported")
        for label, value in (("python", self.python), ("glibc", self.glibc)):
            parts = value.split(".")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise LockError(f"{label} version {value!r}: expected X.Y")

    @property
    def pip_platforms(self) -> tuple[str, ...]:
        """Every `--platform` pip download must be given: pip expands only the legacy manylinux
        names, so manylinux_2_17 .. manylinux_2_<glibc> are listed one by one."""
        minor = int(self.glibc.split(".")[1])
        tags = [f"manylinux_2_{m}_{self.machine}" for m in range(minor, 16, -1)]
        return (*tags, f"manylinux2014_{self.machine}")

    def marker_env(self) -> dict[str, str]:
        """PEP 508 marker variables as the device's interpreter would report them."""
        return {
            "python_version": self.python,
            "python_full_version": f"{self.python}.0",
            "platform_machine": self.machine,
            "sys_platform": "linux",
            "platform_system": "Linux",
            "os_name": "posix",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
        }

    @property
    def key(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.machine}-glibc{self.glibc}"


@dataclass(frozen=True)
class Lock:
    """The pinned closure: `name==version` lines, sorted, and their digest."""

    pins: tuple[str, ...]
    """"name==version", canonical names, sorted."""

    @property
    def text(self) -> str:
        return "".join(f"{p}\n" for p in self.pins)

    @property
    def digest(self) -> str:
        """First 16 hex digits of the lock text's SHA-256: names the device's deps venv."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str], str | None]:
    """(name, version, Requires-Dist lines, Requires-Python) read from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if not names:
            raise LockError(f"{wheel}: not a wheel (no .dist-info/METADATA)")
        meta = HeaderParser().parsestr(zf.read(names[0]).decode())
    return meta["Name"], meta["Version"], meta.get_all("Requires-Dist") or [], meta.get("Requires-Python")


def _wanted(req: Requirement, extras: frozenset[str], env: dict[str, str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def resolve(requires: list[str], platform: DevicePlatform, requires_python: str | None = None) -> Lock:
    """Pin the closure of `requires` (Requires-Dist lines) at this environment's installed versions.

    Raises LockError when the device's Python is outside `requires_python`, when a requirement
    the device needs is not installed here, or when the installed version breaks a specifier."""
    if requires_python and platform.python + ".0" not in SpecifierSet(requires_python):
        raise LockError(f"the agent needs Python {requires_python}; the device has {platform.python}")
    env = platform.marker_env()
    pins: dict[str, str] = {}
    walked: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), frozenset[str]()) for r in requires]
    while todo:
        req, extras = todo.pop()
        if not _wanted(req, extras, env):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise LockError(f"{req.name} (for {req}) is not installed here: pip install '{req}'") from None
        if not req.specifier.contains(dist.version, prereleases=True):
            raise LockError(f"{req} is required but {req.name} {dist.version} is installed here")
        pins[name] = dist.version
        if (name, frozenset(req.extras)) in walked:  # each (distribution, extras) is expanded once
            continue
        walked.add((name, frozenset(req.extras)))
        todo.extend((Requirement(r), frozenset(req.extras)) for r in dist.requires or [])
    return Lock(tuple(f"{n}=={v}" for n, v in sorted(pins.items()) if n not in _NEVER_PINNED))
