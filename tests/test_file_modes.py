"""Secrets and state are the owner's only: every directory the hub and the agent keep is 0700 and
every file in it 0600 (0400 for one never written again), whether the run made them or found them
readable from an earlier version.

A full run of the real commands, twice: `tandem hub up` (registry, managed Mosquitto, --api-key-file
over an existing 0644 file) and `tandem agent run` (credential, telemetry spool), one request served
and telemetry spooled, then both killed with SIGKILL so that SQLite's -wal and -shm files stay
behind. Every mode is loosened to 0755 / 0644, and the same commands start again on the same
directories: everything must be tightened, while they run and after they stop.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cloud_hub.registry import create_token
from cloud_hub.store import open_store
from tandem import Client
from tests.hubkit import ROOT, needs_mosquitto, tiny_llama

pytestmark = needs_mosquitto
WAIT_S = 60.0


def modes(*roots: Path) -> dict[str, int]:
    """path -> permission bits, for each root and everything under it."""
    out = {}
    for root in roots:
        for path in (root, *root.rglob("*")):
            out[str(path)] = stat.S_IMODE(path.lstat().st_mode)
    return out


def loose(found: dict[str, int]) -> dict[str, int]:
    """What is open to anyone but the owner: directories other than 0700, files with group or other bits."""
    return {p: m for p, m in found.items() if (m != 0o700 if Path(p).is_dir() else m & 0o077 or not m & 0o600)}


def loosen(*roots: Path) -> None:
    for p in modes(*roots):
        os.chmod(p, 0o755 if Path(p).is_dir() else 0o644)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def command(log: Path, *argv: str, ready: str = "") -> Iterator[subprocess.Popen]:
    """`python -m tandem_cli *argv`, its output appended to `log`; waits for `ready` in what it writes.
    SIGKILLed at exit unless it has ended already."""
    start = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem_cli", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        wait(lambda: ready in log.read_text()[start:] or proc.poll() is not None, f"{argv[:2]} to start")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def wait(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def run_once(tmp: Path, port: int, crash: bool) -> dict[str, int]:
    """Serve one request through a hub and an agent; returns the modes seen while both ran."""
    data, state, key_file = tmp / "hub", tmp / "agent", tmp / "keys" / "hub-key"
    hub_argv = ("hub", "up", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}", "--api-key-file", str(key_file))
    with command(tmp / "hub.log", *hub_argv, ready="hub ready on") as hub:
        store = open_store("sqlite", data)
        token = create_token(store, 60)
        store.close()
        agent_argv = ("agent", "run", "--hub", f"127.0.0.1:{port}", "--token", token, "--profile", "cpu-2core",
                      "--model", str(tiny_llama(tmp)), "--name", "edge-1", "--state-dir", str(state))  # fmt: skip
        with command(tmp / "agent.log", *agent_argv, ready="agent edge-1") as agent:
            with Client(f"127.0.0.1:{port}", api_key=key_file.read_text(), timeout=30) as client:
                wait(lambda: [d.status for d in client.devices()] == ["online"], "the agent to connect")
                assert client.generate("the cat", max_tokens=2).completion_tokens == 2
            wait(lambda: (state / "telemetry-spool.db").exists(), "the telemetry spool")
            running = modes(data, state) | modes(key_file)
            if not crash:
                stop(agent)
        if not crash:
            stop(hub)
    return running


def test_data_directories_are_private_made_or_found(tmp_path: Path) -> None:
    data, state, key_file = tmp_path / "hub", tmp_path / "agent", tmp_path / "keys" / "hub-key"
    key_file.parent.mkdir(mode=0o755)
    key_file.write_text("an old key")
    key_file.chmod(0o644)  # --api-key-file over an existing readable file
    port = free_port()

    first = run_once(tmp_path, port, crash=True)
    assert not loose(first), loose(first)
    left = modes(data, state)
    assert any(p.endswith("registry.db-wal") for p in left) and any(p.endswith("spool.db-wal") for p in left)
    loosen(data, state, key_file)

    again = run_once(tmp_path, port, crash=False)
    assert not loose(again), loose(again)
    assert {"registry.db", "registry.db-wal", "registry.db-shm", "credentials.json", "telemetry-spool.db"} <= {
        Path(p).name for p in again
    }
    after = modes(data, state) | modes(key_file)
    assert not loose(after), loose(after)
