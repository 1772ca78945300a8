"""A hub and agents as separate processes on this machine, as an operator starts them.

`make run` (scripts/main_job.py) and benchmarks/budgets.py use it: `tandem hub up` with a managed
Mosquitto, then `tandem agent run` per device with a one-time token, each its own process. Leaving
the `with` block stops the agents, then the hub, with SIGTERM (SIGKILL after 15 s) and records
their exit codes.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

TANDEM = [sys.executable, "-m", "tandem_cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_line(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Read proc's stdout until a line containing marker, and return it; the rest of its output is
    drained in the background (a full pipe would stall the process), the last lines kept in
    `proc.tail`. Raises on exit or timeout."""
    found = threading.Event()
    lines: collections.deque[str] = collections.deque(maxlen=200)
    proc.tail = lines  # type: ignore[attr-defined]

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip())
            if not found.is_set() and marker in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        tail = "\n".join(list(lines)[-20:])
        raise RuntimeError(f"no '{marker}' from {' '.join(proc.args[3:6])} within {timeout} s:\n{tail}")  # type: ignore[index]
    return next(line for line in lines if marker in line)


def shutdown(procs: list[subprocess.Popen]) -> list[int]:
    """SIGTERM the last started first (agents before the hub); kill whatever still runs after 15 s."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


class Fleet:
    """`with Fleet(work, cloud_model, cloud_profile) as f: f.agent(...); f.wait_online()`."""

    def __init__(
        self,
        work: Path,
        cloud_model: str | None,
        cloud_profile: str,
        hub_args: list[str] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.work, self.cloud_model, self.cloud_profile = work, cloud_model, cloud_profile
        self.hub_args = hub_args or []
        self.log = log
        self.address = f"127.0.0.1:{free_port()}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen] = []
        self.agents: dict[str, subprocess.Popen] = {}
        self.agent_lines: dict[str, str] = {}
        """Each agent's start-up line (what it serves and how it calibrated itself)."""
        self.names: dict[str, str] = {}
        """Device id -> agent name, once online."""
        self.api_key = ""
        self.codes: list[int] = []

    def __enter__(self) -> Fleet:
        cmd = [*TANDEM, "hub", "up", "--data-dir", str(self.work / "hub"), "--listen", self.address,
               "--api-key-file", str(self.work / "api-key"), "--cloud-profile", self.cloud_profile,
               *self.hub_args]  # fmt: skip
        if self.cloud_model:
            cmd += ["--cloud-model", self.cloud_model]
        hub = self._spawn(cmd)
        try:
            self.log(wait_line(hub, "hub ready", 300))
        except RuntimeError:
            self.__exit__()
            raise
        self.api_key = (self.work / "api-key").read_text().strip()
        return self

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        self.procs.append(p)
        return p

    def agent(
        self, name: str, profile: str, model: str, emulated: bool = False, extra: list[str] | None = None
    ) -> None:
        token = subprocess.run(
            [*TANDEM, "hub", "token", "create", "--data-dir", str(self.work / "hub")],
            capture_output=True, text=True, check=True, env=self.env,
        ).stdout.strip()  # fmt: skip
        cmd = [*TANDEM, "agent", "run", "--hub", self.address, "--token", token, "--profile", profile,
               "--model", model, "--name", name, "--state-dir", str(self.work / name), *(extra or [])]  # fmt: skip
        self.agents[name] = self._spawn(cmd + (["--emulate"] if emulated else []))
        # One at a time: each agent times the host to calibrate itself as it starts, and two doing so at
        # once on a 2-core host would each measure the other's load.
        self.agent_lines[name] = wait_line(self.agents[name], f"agent {name}:", 300)

    def wait_online(self, timeout: float = 300) -> None:
        """Wait for every agent online at the hub."""
        from tandem import Client

        with Client(self.address, api_key=self.api_key, timeout=60) as client:
            deadline = time.time() + timeout
            while sum(d.status == "online" for d in client.devices()) < len(self.agents):
                if time.time() > deadline:
                    raise RuntimeError(f"agents did not come online within {timeout} s")
                time.sleep(0.5)
            self.names = {d.device_id: d.name for d in client.devices()}

    def ids(self) -> list[str]:
        """Device ids of the agents, in the order they were started."""
        by_name = {v: k for k, v in self.names.items()}
        return [by_name[n] for n in self.agents if n in by_name]

    def __exit__(self, *exc: object) -> None:
        self.codes = shutdown(self.procs)
