"""Helpers the device-side scripts share (device_side.py, device_service.py): standard library only,
Python >= 3.9, copied beside them into R/bin/ and imported from there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

SLOTS = ("a", "b")
UNIT = "tandem-agent.service"
AGENT_USER = "tandem-agent"


class Fail(Exception):
    """An error for the operator: printed as {"error": ...}, exit status 1."""


def write_atomic(path: Path, data: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def link_atomic(link: Path, target: str) -> None:
    """Point `link` at `target`: a fresh link renamed over the old one, so readers see either."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run(argv: list[str], what: str, env: dict | None = None) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise Fail(f"{what} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-1500:]}")
    return out.stdout


def slot_of(link: Path) -> str | None:
    """The slot a link points at ("a"/"b"), or None when there is no link."""
    if not link.is_symlink():
        return None
    name = Path(os.readlink(link)).name
    return name if name in SLOTS else None


def other(slot: str | None) -> str:
    return "b" if slot == "a" else "a"


def slot_version(root: Path, slot: str | None) -> str | None:
    path = root / "slots" / (slot or "-") / "VERSION"
    return path.read_text().strip() if slot and path.is_file() else None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def systemd_running() -> bool:
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return False
    return subprocess.run(["systemctl", "show", "--property=Version"], capture_output=True).returncode == 0
