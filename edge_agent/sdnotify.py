"""systemd's notify protocol, sender side: READY=1 once serving, WATCHDOG=1 while healthy.

Under a unit with `Type=notify` (and `WatchdogSec=`), systemd passes NOTIFY_SOCKET (a unix datagram
socket; a leading "@" is the abstract namespace) and WATCHDOG_USEC. `supervise` sends READY=1 when
the agent is first connected to its hub and serving, then WATCHDOG=1 every WATCHDOG_USEC / 2 from a
task on the agent's event loop: a loop that stops turning (blocked, deadlocked) stops the pings, and
systemd restarts the agent. Without NOTIFY_SOCKET nothing is sent. The standard library only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("tandem.agent.sdnotify")


def notify(state: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not under systemd or the send failed."""
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", env.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval_s(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC (None: no watchdog, or one meant for
    another process, WATCHDOG_PID)."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


async def supervise(ready: asyncio.Event, env: Mapping[str, str] = os.environ) -> None:
    """READY=1 once `ready` is set, then WATCHDOG=1 every watchdog interval until cancelled. Returns
    at once when not under systemd."""
    if not env.get("NOTIFY_SOCKET"):
        return
    interval = watchdog_interval_s(env)
    if interval is not None:  # pings before READY too: a slow first connect must not look like a hang
        pinger = asyncio.create_task(_ping(interval, env))
    try:
        await ready.wait()
        notify("READY=1", env)
        await asyncio.Event().wait()  # until cancelled
    finally:
        if interval is not None:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)


async def _ping(interval: float, env: Mapping[str, str]) -> None:
    while True:
        notify("WATCHDOG=1", env)
        await asyncio.sleep(interval)
