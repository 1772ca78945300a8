"""The device's facts, read by one probe, and the pre-flight check over them.

    facts = await gather_facts(target)                  # runs PROBE with the device's python3
    report = preflight(facts, profile, requirements)    # pure: plain data in, checks out
    if not report.ok: raise SystemExit(report.render())

The probe is standard-library Python (3.6+: old images on boards still ship it) and prints one JSON
object; nothing is installed to run it. Sizes are bytes; versions are strings as the device reports
them ("3.11.2", "535.104.05", "12.2").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from device_profiles import DeviceProfile
from flashing.target import Target, TargetError

PROBE_TIMEOUT_S = 60.0
"""nvidia-smi alone can take seconds on a cold Jetson; the rest reads a few files."""

PROBE = r"""
import json, os, platform, re, shutil, subprocess, sys

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None

def meminfo():
    out = {}
    for line in (read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        if rest.split():
            out[key] = int(rest.split()[0]) * 1024  # kB
    return out

def os_name():
    for line in (read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.platform()

def disk(root):
    path = os.path.abspath(os.path.expanduser(root))
    while not os.path.exists(path):  # the root is made later: what holds it is what fills up
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return path, st.f_bavail * st.f_frsize

def sh(argv):
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace") if out.returncode == 0 else None

def gpus():
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"]
    rows = []
    for line in (sh(query) or "").splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 3:
            mib = int(cells[2]) if cells[2].isdigit() else 0  # "[N/A]" on Jetson's unified memory
            rows.append({"name": cells[0], "driver": cells[1], "memory_bytes": mib * 1024 * 1024})
    return rows

def cuda():
    found = re.search(r"CUDA Version:\s*([0-9.]+)", sh(["nvidia-smi"]) or "")
    if found:
        return found.group(1)
    try:
        return json.loads(read("/usr/local/cuda/version.json") or "")["cuda"]["version"]
    except (ValueError, KeyError, TypeError):
        return None

def l4t():
    text = read("/etc/nv_tegra_release")
    if not text:
        return None
    found = re.search(r"R(\d+) \(release\), REVISION: ([0-9.]+)", text)
    return "R%s.%s" % found.groups() if found else text.splitlines()[0].strip("# ")

mem = meminfo()
disk_path, disk_free = disk(sys.argv[1])
print(json.dumps({
    "arch": platform.machine(),
    "os": os_name(),
    "python": platform.python_version(),
    "libc": "%s %s" % platform.libc_ver(),
    "mem_total": mem.get("MemTotal", 0),
    "mem_available": mem.get("MemAvailable", mem.get("MemFree", 0)),
    "disk_path": disk_path,
    "disk_free": disk_free,
    "compiler": shutil.which("gcc") or shutil.which("cc"),
    "systemd": os.path.isdir("/run/systemd/system"),
    "gpus": gpus(),
    "cuda": cuda(),
    "l4t": l4t(),
}))
"""


@dataclass(frozen=True)
class GpuFacts:
    """One NVIDIA GPU, as nvidia-smi lists it."""

    name: str
    """Product name, e.g. "NVIDIA GeForce RTX 3060" or "Orin (nvgpu)"."""
    driver: str
    """Driver version."""
    memory_bytes: int
    """Its own memory; 0 where it shares the system's (Jetson)."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the probe found on the device."""

    arch: str
    """platform.machine(): x86_64, aarch64, ..."""
    os: str
    """PRETTY_NAME from /etc/os-release."""
    python: str
    """Version of the device's python3, e.g. "3.11.2"."""
    libc: str
    """The C library python3 runs on, e.g. "glibc 2.36" (musl: " "): which manylinux wheels run there."""
    mem_total: int
    """MemTotal, bytes."""
    mem_available: int
    """MemAvailable: what a new process can take without swapping, bytes."""
    disk_path: str
    """The nearest existing folder at or above the install root, where disk_free was measured."""
    disk_free: int
    """Bytes free there for an unprivileged writer."""
    compiler: str | None
    """Path of gcc (or cc); our int4/int8 CPU kernels are compiled on the device."""
    systemd: bool
    """systemd is the running init (/run/systemd/system): the agent can run as a service."""
    gpus: tuple[GpuFacts, ...] = ()
    """NVIDIA GPUs (nvidia-smi); empty when it is absent."""
    cuda: str | None = None
    """CUDA version (nvidia-smi's header, else /usr/local/cuda/version.json)."""
    l4t: str | None = None
    """Jetson Linux release from /etc/nv_tegra_release, e.g. "R36.3.0" (JetPack 6.0)."""

    @classmethod
    def from_probe(cls, data: dict) -> DeviceFacts:
        """Raises KeyError/TypeError for output that is not PROBE's."""
        return cls(**{**data, "gpus": tuple(GpuFacts(**g) for g in data["gpus"])})

    @property
    def glibc(self) -> str | None:
        """ "2.36" for glibc 2.36; None for another C library."""
        name, _, version = self.libc.partition(" ")
        return ".".join(version.split(".")[:2]) if name == "glibc" and version else None

    @property
    def python_minor(self) -> str:
        """ "3.11" from "3.11.2"."""
        return ".".join(self.python.split(".")[:2])


async def gather_facts(target: Target) -> DeviceFacts:
    """Run PROBE on the device. Raises TargetError when the device has no python3, or the probe fails."""
    # `command -v` first: a missing python3 then exits 127 on every target, whatever runs the command.
    script = 'command -v python3 >/dev/null 2>&1 || exit 127; exec python3 -c "$0" "$@"'
    out = await target.run(["sh", "-c", script, PROBE, str(target.root)], timeout=PROBE_TIMEOUT_S, check=False)
    if out.rc == 127:
        raise TargetError(
            f"{target.url}: the device has no python3 (the agent needs it): install it, e.g. "
            "`apt install python3` (Debian, Ubuntu, Raspberry Pi OS, Jetson Linux)"
        )
    if out.rc != 0:
        raise TargetError(f"{target.url}: the device probe failed (exit {out.rc}): {out.stderr.strip()[-2000:]}")
    try:
        return DeviceFacts.from_probe(json.loads(out.stdout))
    except (ValueError, KeyError, TypeError) as exc:
        raise TargetError(f"{target.url}: the device probe printed something unexpected: {out.stdout[:500]!r}") from exc


# -- pre-flight -------------------------------------------------------------------------------------------

HEADROOM = 0.20
"""Margin on memory and disk: MemAvailable moves with page cache and other services, and a device that
runs its model at the edge of its memory swaps or gets OOM-killed under load (and the disk needs room for
logs, the journal and the next flash's .part files)."""

SHIPPED_ARCHES = ("x86_64", "aarch64")
"""Architectures we build wheels for (manylinux x86_64 and aarch64: PCs, Jetson, Raspberry Pi 4/5)."""

_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

BACKEND_PROFILE_NAME = {"cpu": None, "cuda": "cuda", "tensorrt": "tensorrt"}
"""Requirements.backend -> the name the device profile must list in `backends` (None: any profile)."""


@dataclass(frozen=True)
class Requirements:
    """What the flash needs of the device; the orchestrator builds it from the bundle and the wheelhouse."""

    model: str
    """Model name, for messages."""
    resident_bytes: int
    """Memory the model takes once loaded at the chosen quant (weights, KV cache)."""
    runtime_bytes: int
    """Memory the agent takes besides the model (interpreter, torch, buffers)."""
    payload_bytes: int
    """Bytes still to copy onto the device (bundle, wheels, config)."""
    installed_bytes: int
    """Bytes the install adds on top of the payload (the unpacked venv)."""
    python: str = "3.11"
    """major.minor the wheelhouse was built for; the device's python3 must be the same."""
    backend: str = "cpu"
    """What computes the tokens: one of BACKEND_PROFILE_NAME (cpu: our C kernels)."""
    arches: tuple[str, ...] = SHIPPED_ARCHES
    """Architectures the wheelhouse has wheels for."""

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_PROFILE_NAME:
            raise ValueError(f"backend must be one of {sorted(BACKEND_PROFILE_NAME)}, got {self.backend!r}")
        for name in ("resident_bytes", "runtime_bytes", "payload_bytes", "installed_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def memory_bytes(self) -> int:
        return self.resident_bytes + self.runtime_bytes


@dataclass(frozen=True)
class Check:
    """One pre-flight check."""

    name: str
    """arch, python, memory, profile memory, disk, backend, gpu memory."""
    ok: bool
    """Whether the device passes it."""
    detail: str
    """What was compared; for a failure, also what to do."""


@dataclass(frozen=True)
class PreflightReport:
    """All checks, failed or not (an operator fixes everything in one go)."""

    checks: tuple[Check, ...] = field(default_factory=tuple)
    """In a fixed order: arch, python, memory, profile memory, disk, backend, then gpu memory when it applies."""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def render(self) -> str:
        """A plain-text table: one line per check."""
        width = max((len(c.name) for c in self.checks), default=0)
        return "\n".join(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in self.checks)


def preflight(facts: DeviceFacts, profile: DeviceProfile, req: Requirements) -> PreflightReport:
    """Every check of the device against what the flash needs. Pure; never raises for a misfit."""
    checks = (
        _arch(facts, req),
        _python(facts, req),
        _memory(facts, req),
        _profile_memory(profile, req),
        _disk(facts, req),
        _backend(facts, profile, req),
    )
    gpu = _gpu_memory(facts, req)
    return PreflightReport(checks if gpu is None else (*checks, gpu))


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _with_headroom(n: int) -> int:
    return int(n * (1 + HEADROOM))


def _arch(facts: DeviceFacts, req: Requirements) -> Check:
    arch = _ARCH_ALIASES.get(facts.arch, facts.arch)
    if arch in req.arches:
        return Check("arch", True, arch)
    return Check("arch", False, f"{facts.arch}: we ship wheels for {', '.join(req.arches)} only")


def _python(facts: DeviceFacts, req: Requirements) -> Check:
    if facts.python_minor == req.python:
        return Check("python", True, facts.python)
    return Check(
        "python",
        False,
        f"the device has Python {facts.python}, the wheelhouse is built for {req.python}: install python{req.python}",
    )


def _memory(facts: DeviceFacts, req: Requirements) -> Check:
    need = _with_headroom(req.memory_bytes)
    detail = (
        f"needs {need} bytes ({gb(need)}: model {gb(req.resident_bytes)} + runtime {gb(req.runtime_bytes)} "
        f"+ {HEADROOM:.0%}), {facts.mem_available} bytes ({gb(facts.mem_available)}) available"
    )
    if need <= facts.mem_available:
        return Check("memory", True, detail)
    return Check("memory", False, f"{req.model} does not fit: {detail}; pick a smaller model or quant")


def _gpu_memory(facts: DeviceFacts, req: Requirements) -> Check | None:
    """On a discrete GPU the model lives in the GPU's own memory (None: CPU, or Jetson's shared memory)."""
    if req.backend == "cpu" or not facts.gpus or not facts.gpus[0].memory_bytes:
        return None
    gpu = facts.gpus[0]
    need = _with_headroom(req.resident_bytes)
    detail = f"needs {need} bytes ({gb(need)}), {gpu.name} has {gpu.memory_bytes} bytes ({gb(gpu.memory_bytes)})"
    return Check("gpu memory", need <= gpu.memory_bytes, detail)


def _profile_memory(profile: DeviceProfile, req: Requirements) -> Check:
    limit = int(profile.memory_gb * 1e9)
    detail = f"needs {req.memory_bytes} bytes ({gb(req.memory_bytes)}), profile {profile.name} allows {gb(limit)}"
    if req.memory_bytes <= limit:
        return Check("profile memory", True, detail)
    return Check("profile memory", False, f"{req.model} does not fit: {detail}")


def _disk(facts: DeviceFacts, req: Requirements) -> Check:
    need = _with_headroom(req.payload_bytes + req.installed_bytes)
    detail = (
        f"needs {need} bytes ({gb(need)}: payload {gb(req.payload_bytes)} + install {gb(req.installed_bytes)} "
        f"+ {HEADROOM:.0%}), {facts.disk_free} bytes ({gb(facts.disk_free)}) free at {facts.disk_path}"
    )
    if need <= facts.disk_free:
        return Check("disk", True, detail)
    return Check("disk", False, f"{detail}: free some space or choose another install root")


def _backend(facts: DeviceFacts, profile: DeviceProfile, req: Requirements) -> Check:
    listed = BACKEND_PROFILE_NAME[req.backend]
    if listed is not None and listed not in profile.backends:
        return Check(
            "backend", False, f"{req.backend}: profile {profile.name} lists only {', '.join(profile.backends)}"
        )
    ok, detail = _BACKEND_ON_DEVICE[req.backend](facts)
    return Check("backend", ok, f"{req.backend}: {detail}")


def _cpu_on_device(facts: DeviceFacts) -> tuple[bool, str]:
    if facts.compiler:
        return True, f"C compiler {facts.compiler}"
    return False, "no C compiler (gcc or cc): our CPU kernels compile on the device; install gcc (apt install gcc)"


def _cuda_on_device(facts: DeviceFacts) -> tuple[bool, str]:
    gpu = facts.gpus[0] if facts.gpus else None
    if gpu is None and facts.l4t is None:
        return False, "no NVIDIA GPU found (nvidia-smi missing or lists none): install the NVIDIA driver"
    if facts.cuda is None:
        return False, "no CUDA found (nvidia-smi header, /usr/local/cuda/version.json): install the CUDA toolkit"
    if gpu is not None:
        return True, f"{gpu.name}, driver {gpu.driver}, CUDA {facts.cuda}"
    return True, f"Jetson L4T {facts.l4t}, CUDA {facts.cuda}"  # JetPack 5 has no nvidia-smi


_BACKEND_ON_DEVICE = {"cpu": _cpu_on_device, "cuda": _cuda_on_device, "tensorrt": _cuda_on_device}
"""Requirements.backend -> whether the device can run it, and what was found."""
