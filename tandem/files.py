"""Files that hold state or secrets (the hub's registry and broker files, the agent's spool): 0600 in
0700 directories, tightened when found looser. Here, beside tandem.wire, because the hub and the agent
share it and never import each other; the standard library only, like the rest of the SDK."""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> None:
    """Make `path` (and missing parents) with mode 0700, or tighten it to 0700 if it exists."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def private_file(path: Path, create: bool) -> None:
    """Make `path` an empty 0600 file if `create` and it is missing; tighten it to 0600 if it exists."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes | str) -> None:
    """Atomically replace `path` with a 0600 file holding `data` (str: UTF-8): a crash leaves the
    old file or the new one, and the secret is never readable by others, not even while written."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
