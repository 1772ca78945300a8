"""A resumable, checksummed copy of files onto a device.

    report = await sync(target, [(Path("model.gguf"), "slots/a/model.gguf", None), ...], progress=bar)

For each file, in order:
  1. the device already has it (same size and SHA-256) -> skipped, nothing sent;
  2. else it is written into `<remote>.part`: an existing .part whose leading whole chunks match the
     local file (SHA-256 of that prefix, computed on the device) is continued from there, anything
     else is started over;
  3. the whole .part's SHA-256 is checked on the device, then it is renamed into place with `mv` on
     the device (rename(2) within one folder: the file appears whole or not at all).

Writing in 1 MiB chunks, each acknowledged before the next, means an interrupted copy leaves a .part
whose whole chunks are good: the next sync resumes at the last whole chunk (a chunk in flight when
the link dropped may be written out of order, so its bytes are not trusted).
Sizes are bytes. Raises TargetError (from the target) when the device fails us, with the .part left
for the next try; DiskFull when its disk fills, with the .part removed (the room it took is given back,
and nothing half-written passes for done).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from flashing.target import DiskFull, Target, TargetError, file_sha256

CHUNK = 1 << 20
"""Bytes per write, and the granularity at which an interrupted copy resumes."""

Progress = Callable[[int, int, str], None]
"""progress(bytes_done, bytes_total, name): bytes_done counts bytes in place on the device (skipped
files and resumed prefixes included), so a bar ends at bytes_total; name is the file's remote name."""

FileSpec = tuple[Path, "PurePosixPath | str", "str | None"]
"""(local file, remote path (relative: under the target's root), its SHA-256 hex or None to compute)."""


@dataclass(frozen=True)
class FileReport:
    """What sync did with one file."""

    remote: PurePosixPath
    """Where the file is on the device."""
    size: int
    """The file's size in bytes."""
    sent: int
    """Bytes written to the device this time."""
    action: Literal["skipped", "sent", "resumed"]
    """skipped: already there; sent: copied from the start; resumed: continued from a .part."""
    resumed_from: int = 0
    """For a resumed file, the bytes of its .part kept from the earlier try."""


@dataclass(frozen=True)
class TransferReport:
    """What a sync did, file by file."""

    files: tuple[FileReport, ...]
    """One entry per file, in the order given."""

    @property
    def bytes_sent(self) -> int:
        return sum(f.sent for f in self.files)

    @property
    def files_sent(self) -> int:
        """Files written (resumed ones included)."""
        return sum(f.action != "skipped" for f in self.files)

    @property
    def files_skipped(self) -> int:
        return sum(f.action == "skipped" for f in self.files)

    @property
    def files_resumed(self) -> int:
        return sum(f.action == "resumed" for f in self.files)


@dataclass(frozen=True)
class _Local:
    path: Path
    remote: PurePosixPath
    size: int
    sha256: str


class _Meter:
    """Adds up bytes in place and reports them to the progress callback."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def add(self, n: int, name: str) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total, name)


async def sync(target: Target, files: Sequence[FileSpec], progress: Progress | None = None) -> TransferReport:
    """Copy `files` onto `target` (see the module docstring). Local files that cannot be read raise
    OSError before anything is sent."""
    plan = [_local(target, *spec) for spec in files]
    meter = _Meter(sum(f.size for f in plan), progress)
    there = await _already_there(target, plan)
    return TransferReport(tuple([await _sync_one(target, f, meter, f.remote in there) for f in plan]))


async def _already_there(target: Target, plan: Sequence[_Local]) -> set[PurePosixPath]:
    """The remote files whose size and SHA-256 already match: sizes one by one (cheap over SFTP),
    then the candidates' hashes in one command."""
    sizes = [await target.size(f.remote) for f in plan]
    candidates = [f for f, size in zip(plan, sizes, strict=True) if size == f.size]
    digests = await target.sha256_many([f.remote for f in candidates])
    return {f.remote for f in candidates if digests[f.remote] == f.sha256}


def _local(target: Target, path: Path, remote: PurePosixPath | str, sha256: str | None) -> _Local:
    path = Path(path)
    return _Local(path, target.path(remote), path.stat().st_size, sha256 or file_sha256(path))


async def _sync_one(target: Target, f: _Local, meter: _Meter, there: bool) -> FileReport:
    name = f.remote.name
    if there:
        meter.add(f.size, name)
        return FileReport(f.remote, f.size, 0, "skipped")
    part = f.remote.with_name(f.remote.name + ".part")
    start = await _resume_point(target, part, f)
    meter.add(start, name)
    try:
        sent = await target.write(part, start, _chunks(f.path, start, lambda n: meter.add(n, name)))
    except DiskFull:
        await target.run(["rm", "-f", str(part)], check=False)
        raise
    digest = await target.sha256(part)
    if digest != f.sha256:
        await target.run(["rm", "-f", str(part)], check=False)
        raise TargetError(f"{target.url}: {f.remote} arrived with SHA-256 {digest}, expected {f.sha256}: copy again")
    await target.run(["mv", "-f", str(part), str(f.remote)])
    return FileReport(f.remote, f.size, sent, "resumed" if start else "sent", start)


async def _resume_point(target: Target, part: PurePosixPath, f: _Local) -> int:
    """Bytes of an existing .part to keep: its whole chunks, if they equal the local file's start."""
    have = await target.size(part)
    if not have:
        return 0
    n = min(have, f.size) // CHUNK * CHUNK
    if n and await target.sha256(part, n) == file_sha256(f.path, n):
        return n
    return 0


def _chunks(path: Path, start: int, sent: Callable[[int], None]) -> Iterator[bytes]:
    """The file's bytes from `start`, CHUNK at a time; `sent(n)` runs when the target asks for the
    next chunk, that is once the previous one is written."""
    with path.open("rb") as fh:
        fh.seek(start)
        while block := fh.read(CHUNK):
            yield block
            sent(len(block))
