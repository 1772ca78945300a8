"""Real hubs and agents for integration tests: gRPC over loopback, a managed Mosquitto, tiny models."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_hub.broker import find_mosquitto
from cloud_hub.server import Hub, HubConfig
from edge_agent.agent import Agent, AgentConfig
from models.runtime import load
from models.serving import ServedModel
from tests.tiny import TinySpec, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
needs_mosquitto = pytest.mark.skipif(
    find_mosquitto() is None, reason="mosquitto is not installed (make test installs it)"
)


def tiny_llama(folder: Path) -> Path:
    path = folder / "tiny-llama.gguf"
    if not path.exists():
        write_tiny_gguf(path, TinySpec(arch="llama", n_layers=2, context_length=256))
    return path


@contextlib.asynccontextmanager
async def running_hub(
    data_dir: Path, cloud_model: str | None, mqtt: str = "managed", listen: str = "127.0.0.1:0", **kw: object
) -> AsyncIterator[Hub]:
    hub = Hub(HubConfig(data_dir=data_dir, listen=listen, cloud_model=cloud_model, mqtt=mqtt, **kw))
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop(grace=0.5)


@dataclass
class RunningAgent:
    agent: Agent
    stop: asyncio.Event
    task: asyncio.Task

    @property
    def device_id(self) -> str:
        assert self.agent.creds is not None
        return self.agent.creds.device_id

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


async def start_agent(hub: Hub, model_path: Path, state_dir: Path, name: str, profile: str = "cpu-2core",
                      model_name: str = "tiny") -> RunningAgent:  # fmt: skip
    """An in-process agent serving the GGUF at model_path under model_name; returns once connected."""
    served = ServedModel(model_name, load(model_path, use_cache=False))
    return await start_served_agent(hub, served, state_dir, name, profile)


async def start_served_agent(
    hub: Hub, served: ServedModel, state_dir: Path, name: str, profile: str = "cpu-2core", address: str = ""
) -> RunningAgent:
    """An in-process agent serving `served` (a counting or paced model, say), dialling `address`
    (default the hub's); returns once it is online."""
    config = AgentConfig(hub=address or hub.address, profile=profile, state_dir=state_dir, name=name,
                         token=hub.registry.create_token(), telemetry_interval_s=0.2)  # fmt: skip
    agent = Agent(config, served)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(agent.connected.wait(), 20)
    await wait_for(lambda: agent.creds is not None and hub.fleet.status_of(agent.creds.device_id) == "online")
    return RunningAgent(agent, stop, task)


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> float:
    """Poll until predicate() is true; returns the seconds it took. Fails the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


def spawn_agent(
    hub: Hub,
    model: str,
    state_dir: Path,
    name: str,
    profile: str = "cpu-2core",
    extra: tuple[str, ...] = (),
    address: str = "",
) -> subprocess.Popen:
    """`tandem agent run` as a real child process (for kill tests), dialling `address` (default the hub's)."""
    token = hub.registry.create_token()
    cmd = [sys.executable, "-m", "tandem_cli", "agent", "run", "--hub", address or hub.address, "--token", token,
           "--profile", profile, "--model", model, "--name", name, "--state-dir", str(state_dir), *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the agent's whole process group, reap it and close the pipe spawn_agent opened."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()
