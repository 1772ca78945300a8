"""The broker as a process and its files on disk: a child tied to the hub's lifetime, its pid and
port, and its log. Plain functions for `cloud_hub.broker.ManagedBroker`; Linux-specific parts
(the death signal, pidfds, /proc) say so.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
LOG_TAIL_LINES = 20
"""Lines of the broker's log quoted in an error."""


def free_port(host: str) -> int:
    # The port is released before mosquitto binds it, so another process could take it in between;
    # mosquitto then exits with "Address already in use", which start() reports.
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def bindable(host: str, port: int) -> bool:
    """Whether mosquitto could listen on port now. SO_REUSEADDR as mosquitto sets it: the connections
    of a broker that just ended linger in TIME_WAIT, which does not stop a new listener."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def spawn_tied(argv: list[str], **popen_kw: Any) -> subprocess.Popen[bytes]:
    """Popen with the child's death signal armed, from a keeper thread that lives as long as the child.

    PR_SET_PDEATHSIG fires when the forking thread ends: a short-lived caller (asyncio.to_thread) would
    kill the broker with it. The keeper forks and then waits for the child, so it ends only after the
    child, or with the whole process.
    """
    spawned: list[subprocess.Popen[bytes] | BaseException] = []
    ready = threading.Event()

    def keep() -> None:
        try:
            proc = subprocess.Popen(argv, preexec_fn=death_signal(os.getpid()), **popen_kw)
        except BaseException as exc:  # handed to the caller below
            spawned.append(exc)
            ready.set()
            return
        spawned.append(proc)
        ready.set()
        proc.wait()

    threading.Thread(target=keep, name="mosquitto-keeper", daemon=True).start()
    ready.wait()
    if isinstance(spawned[0], BaseException):
        raise spawned[0]
    return spawned[0]


def death_signal(parent: int) -> Callable[[], None] | None:
    """A preexec_fn that asks Linux for SIGTERM when the forking thread ends; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died between fork and prctl: no signal would come
            os._exit(1)

    return arm


def is_broker_of(pid: int, conf: Path) -> bool:
    """Whether pid is a live `mosquitto -c <conf>` (a zombie has an empty command line: not live)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(argv) >= 3 and os.path.basename(argv[0]).startswith(b"mosquitto") and argv[1:3] == [b"-c", bytes(conf)]


def signal_broker(pid: int, conf: Path, sig: int) -> bool:
    """Send sig to pid if it is still conf's broker; False if it was gone. A pidfd pins the process
    between the check and the signal, so a recycled pid is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not is_broker_of(pid, conf):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    finally:
        os.close(fd)


def wait_gone(pid: int, conf: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_broker_of(pid, conf):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_from(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read()


def log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(lines[-LOG_TAIL_LINES:]) or "(log empty)"
