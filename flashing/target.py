"""Where a flash goes: one small abstract class, and a registry of URL schemes.

    ssh://user@host[:port]/path   flashing.ssh.SSHTarget (asyncssh; keys only)
    dir:/path                     DirTarget: this machine, a directory standing for the device

A target runs commands on the device and reads and writes its files. Paths are the device's
own, absolute, or relative to the target's root. Every method raises TargetError with a message
an operator can act on (unreachable host, refused key, permission denied, disk full).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import importlib
import os
import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit


def file_sha256(path: Path, length: int | None = None) -> str:
    """SHA-256 hex of a local file (of its first `length` bytes), read a MiB at a time."""
    h = hashlib.sha256()
    left = -1 if length is None else length
    with Path(path).open("rb") as fh:
        while left != 0 and (block := fh.read(1 << 20 if left < 0 else min(left, 1 << 20))):
            h.update(block)
            left = left - len(block) if left > 0 else left
    return h.hexdigest()


class TargetError(Exception):
    """The device cannot be reached, refused us, or a command or file operation on it failed."""


class DiskFull(TargetError):
    """A write stopped because the device's file system at `path` has no room left.

    A subclass so that a copy can clean up after itself (flashing.transfer removes its .part)."""

    def __init__(self, path: PurePosixPath, free_bytes: int) -> None:
        super().__init__(f"the device's disk is full at {path}: {free_bytes} bytes free")
        self.path = path
        self.free_bytes = free_bytes


@dataclass(frozen=True)
class RunResult:
    rc: int
    stdout: str
    stderr: str


class Target(ABC):
    """A device reached over some transport. `root` is where Tandem installs on it."""

    url: str
    root: PurePosixPath

    def path(self, rel: str | PurePosixPath) -> PurePosixPath:
        return self.root / rel

    @abstractmethod
    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 300.0, check: bool = True
    ) -> RunResult:
        """Run `argv` on the device (no shell; use ["sh", "-c", ...] for one). With `check`, a
        non-zero exit raises TargetError naming the command and its stderr."""

    @abstractmethod
    async def size(self, path: PurePosixPath) -> int | None:
        """The file's size in bytes, or None when it does not exist."""

    @abstractmethod
    async def write(self, path: PurePosixPath, offset: int, chunks: Iterable[bytes]) -> int:
        """Write `chunks` into the file at `offset` (creating it, truncating anything past the
        end of what is written); returns the bytes written."""

    @abstractmethod
    async def read(self, path: PurePosixPath) -> bytes:
        """A small file's whole content."""

    async def sha256(self, path: PurePosixPath, length: int | None = None) -> str | None:
        """The SHA-256 of the file (of its first `length` bytes), or None when it does not exist."""
        prog = (
            "import hashlib,sys\n"
            "p, n = sys.argv[1], int(sys.argv[2])\n"
            "h = hashlib.sha256()\n"
            "try:\n f = open(p, 'rb')\nexcept FileNotFoundError:\n print('-'); raise SystemExit\n"
            "with f:\n"
            " while n != 0:\n"
            "  b = f.read(1 << 20 if n < 0 else min(n, 1 << 20))\n"
            "  if not b: break\n"
            "  h.update(b); n -= len(b) if n > 0 else 0\n"
            "print(h.hexdigest())\n"
        )
        out = await self.run(["python3", "-c", prog, str(path), str(-1 if length is None else length)])
        digest = out.stdout.strip()
        return None if digest == "-" else digest

    async def sha256_many(self, paths: Sequence[PurePosixPath]) -> dict[PurePosixPath, str | None]:
        """The SHA-256 of each file (None where it does not exist), in one command on the device:
        a flash checks some seventy files, and a process per file costs more than the hashing."""
        if not paths:
            return {}
        prog = (
            "import hashlib,sys\n"
            "for p in sys.stdin.read().split('\\0'):\n"
            " h = hashlib.sha256()\n"
            " try:\n  f = open(p, 'rb')\n except FileNotFoundError:\n  print('-'); continue\n"
            " with f:\n"
            "  for b in iter(lambda: f.read(1 << 20), b''): h.update(b)\n"
            " print(h.hexdigest())\n"
        )
        out = await self.run(["python3", "-c", prog], stdin="\0".join(map(str, paths)).encode())
        digests = out.stdout.split()
        if len(digests) != len(paths):
            raise TargetError(f"{self.url}: hashing {len(paths)} files answered {len(digests)} lines")
        return {p: None if d == "-" else d for p, d in zip(paths, digests, strict=True)}

    async def close(self) -> None:  # noqa: B027 - most targets hold nothing
        pass

    async def __aenter__(self) -> Target:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class DirTarget(Target):
    """This machine: a directory stands for the device (`dir:/path`). Commands run locally."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = PurePosixPath(os.path.abspath(root))
        self.url = f"dir:{self.root}"

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 300.0, check: bool = True
    ) -> RunResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise TargetError(f"{self.url}: cannot run {shlex.join(argv)}: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise TargetError(f"{self.url}: {shlex.join(argv)} took over {timeout:.0f} s") from exc
        result = RunResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and result.rc != 0:
            raise TargetError(f"{self.url}: {shlex.join(argv)} exited {result.rc}: {result.stderr.strip()[-2000:]}")
        return result

    async def size(self, path: PurePosixPath) -> int | None:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TargetError(f"{self.url}: cannot stat {path}: {exc}") from exc

    async def write(self, path: PurePosixPath, offset: int, chunks: Iterable[bytes]) -> int:
        written = 0
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            with os.fdopen(fd, "r+b") as f:
                f.seek(offset)
                for chunk in chunks:
                    f.write(chunk)
                    written += len(chunk)
                f.truncate()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(path, _free_bytes(Path(path).parent)) from exc
            raise TargetError(f"{self.url}: cannot write {path}: {exc.strerror or exc}") from exc
        return written

    async def read(self, path: PurePosixPath) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise TargetError(f"{self.url}: cannot read {path}: {exc.strerror or exc}") from exc

    async def sha256(self, path: PurePosixPath, length: int | None = None) -> str | None:
        try:
            return file_sha256(Path(path), length)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TargetError(f"{self.url}: cannot read {path}: {exc.strerror or exc}") from exc


def _free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `folder` (0 if unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def dir_target(url: str, identity: str | None = None, known_hosts: str | None = None) -> DirTarget:
    """`dir:/path` (identity and known_hosts mean nothing here)."""
    path = url[len("dir:") :]
    if not path.startswith("/"):
        raise ValueError(f"target {url!r}: dir: takes an absolute path, e.g. dir:/opt/tandem")
    return DirTarget(path)


TargetFactory = Callable[..., Target]
"""factory(url, identity=..., known_hosts=...) -> Target; raises ValueError for a URL it cannot read."""

TARGETS: dict[str, str] = {
    "dir": "flashing.target:dir_target",
    "ssh": "flashing.ssh:SSHTarget",  # imported when used: asyncssh costs about 0.3 s to import
}
"""URL scheme -> "module:factory". Strings, imported on use: this module never imports a transport
(each transport imports this module for the interface)."""


def open_target(url: str, identity: str | None = None, known_hosts: str | None = None) -> Target:
    """The target for `url` (see the module docstring); raises ValueError for one it cannot read."""
    scheme = urlsplit(url).scheme
    if scheme not in TARGETS:
        raise ValueError(f"target {url!r}: use ssh://user@host[:port][/path] or dir:/path")
    module, _, name = TARGETS[scheme].partition(":")
    factory: TargetFactory = getattr(importlib.import_module(module), name)
    return factory(url, identity=identity, known_hosts=known_hosts)
