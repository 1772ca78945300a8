"""The agent's wheel and the wheelhouse of its pinned dependencies, built once and cached.

    <cache>/flash/agent/<source digest>/tandem-<version>-py3-none-any.whl
    <cache>/flash/wheelhouse/<lock digest>-<platform>/*.whl, requirements-<lock digest>.lock, .complete

The agent's wheel is keyed by a digest of the files that go into it, so an unchanged checkout is
never rebuilt; it is built from a copy of exactly those files (the digest cannot miss one, and
the checkout gets no build/ or egg-info droppings). A wheelhouse is complete only once its marker
`.complete` (written last, listing every file with its SHA-256) exists: an interrupted download
is resumed by running pip again over the same folder, which skips the wheels already there.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flashing.lock import DevicePlatform, Lock, LockError, resolve, wheel_metadata
from flashing.target import file_sha256

UV_VERSION = "0.13.9"
"""uv installs the device's venv from local wheels in seconds (pip takes a minute for torch)."""

COMPLETE = ".complete"
Log = Callable[[str], None]


class WheelError(Exception):
    """A wheel could not be built or downloaded; the message carries the tool's own error."""


@dataclass(frozen=True)
class WheelFile:
    """One file of the payload's wheels, with what the copy checks."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class AgentWheel:
    """The agent's wheel and the version the device will report at the hub."""

    file: WheelFile
    version: str
    """The wheel's own version, e.g. "0.1.0"."""
    digest: str
    """SHA-256 of its source files (built here) or of the wheel itself (given by the operator)."""
    requires: tuple[str, ...]
    """Its Requires-Dist lines."""
    requires_python: str | None

    @property
    def agent_version(self) -> str:
        """Version and source digest: two builds of the same version from different source differ."""
        return f"{self.version}+{self.digest[:12]}"


@dataclass(frozen=True)
class Wheelhouse:
    """A complete wheelhouse: the lock and every wheel it pins, plus uv's."""

    dir: Path
    lock: Lock
    lock_file: WheelFile
    wheels: tuple[WheelFile, ...]


def wheel_file(path: Path) -> WheelFile:
    return WheelFile(path, file_sha256(path), path.stat().st_size)


def project_root() -> Path:
    """The checkout this package was imported from (its pyproject.toml's folder)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise WheelError(f"{root} has no pyproject.toml: pass the agent's wheel with --wheel")
    return root


def source_files(root: Path) -> list[Path]:
    """The files a wheel of `root` is built from: pyproject.toml, README.md and every file of the
    packages pyproject's `[tool.setuptools.packages.find] include` names (caches left out)."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {p.split(".")[0] for p in patterns}
    files = [root / "pyproject.toml", *([root / "README.md"] if (root / "README.md").is_file() else [])]
    for top in sorted(d for d in root.iterdir() if d.is_dir() and (d / "__init__.py").is_file()):
        if not any(fnmatch.fnmatch(top.name, t) for t in tops):
            continue
        for path in sorted(top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so"):
                files.append(path)
    return files


def source_digest(root: Path, files: list[Path]) -> str:
    """SHA-256 over each file's relative path and content: a rename counts as a change."""
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(file_sha256(path).encode() + b"\n")
    return h.hexdigest()


def _run(argv: list[str], what: str, log: Log | None) -> None:
    if log:
        log(f"{what}: {' '.join(argv[:6])} ...")
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise WheelError(f"{what} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")


def _agent_wheel(path: Path, digest: str) -> AgentWheel:
    _name, version, requires, requires_python = wheel_metadata(path)
    return AgentWheel(wheel_file(path), version, digest, tuple(requires), requires_python)


def build_agent_wheel(cache: Path, root: Path | None = None, log: Log | None = None) -> AgentWheel:
    """The agent's wheel built from `root` (default: this checkout), reused while its source digest
    is unchanged. Raises WheelError with pip's message when the build fails."""
    root = root or project_root()
    files = source_files(root)
    digest = source_digest(root, files)
    entry = cache / "agent" / digest[:24]
    found = sorted(entry.glob("*.whl")) if entry.is_dir() else []
    if found:
        return _agent_wheel(found[0], digest)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".build-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        for path in files:
            dest = src / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
        _run([*argv, str(src)], "building the agent's wheel", log)
        os.replace(out, entry)  # atomic: a half-built entry is never found
    return _agent_wheel(next(entry.glob("*.whl")), digest)


def given_agent_wheel(path: Path) -> AgentWheel:
    """An operator's wheel (`--wheel`), shipped as it is; its digest is its own SHA-256."""
    if not path.is_file() or path.suffix != ".whl":
        raise WheelError(f"{path}: not a wheel file")
    return _agent_wheel(path, file_sha256(path))


def lock_for(agent: AgentWheel, platform: DevicePlatform) -> Lock:
    """The agent's dependency closure pinned for `platform` (flashing.lock.resolve)."""
    try:
        return resolve(list(agent.requires), platform, agent.requires_python)
    except LockError as exc:
        raise WheelError(str(exc)) from exc


def _download(argv_tail: list[str], platform: DevicePlatform, dest: Path, log: Log | None) -> None:
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    argv += ["--python-version", platform.python, "--implementation", "cp", "-d", str(dest)]
    for tag in platform.pip_platforms:
        argv += ["--platform", tag]
    _run(argv + argv_tail, "downloading the wheelhouse", log)


def _read_complete(entry: Path, lock: Lock) -> Wheelhouse | None:
    marker = entry / COMPLETE
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    wheels = tuple(WheelFile(entry / f["name"], f["sha256"], f["size"]) for f in record["files"])
    lock_path = entry / f"requirements-{lock.digest}.lock"
    return Wheelhouse(entry, lock, WheelFile(lock_path, file_sha256(lock_path), lock_path.stat().st_size), wheels)


def build_wheelhouse(lock: Lock, platform: DevicePlatform, cache: Path, log: Log | None = None) -> Wheelhouse:
    """Every wheel `lock` pins, and uv's, for `platform`, installable offline; cached by the
    lock's digest and the platform. Raises WheelError when pip cannot find a wheel for one."""
    entry = cache / "wheelhouse" / f"{lock.digest}-{platform.key}"
    if (done := _read_complete(entry, lock)) is not None:
        return done
    entry.mkdir(parents=True, exist_ok=True)
    lock_path = entry / f"requirements-{lock.digest}.lock"
    lock_path.write_text(lock.text)
    _download(["-r", str(lock_path)], platform, entry, log)
    _download([f"uv=={UV_VERSION}"], platform, entry, log)
    names = sorted(p.name for p in entry.glob("*.whl"))
    files = [{"name": n, **_sha_size(entry / n)} for n in names]
    tmp = entry / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"lock": lock.digest, "platform": platform.key, "files": files}, indent=1))
    os.replace(tmp, entry / COMPLETE)  # written last: its presence means every wheel is there
    result = _read_complete(entry, lock)
    assert result is not None
    return result


def _sha_size(path: Path) -> dict:
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def unpacked_bytes(wheel: Path) -> int:
    """What a wheel takes once installed: the sum of its members' uncompressed sizes."""
    with zipfile.ZipFile(wheel) as zf:
        return sum(info.file_size for info in zf.infolist())
