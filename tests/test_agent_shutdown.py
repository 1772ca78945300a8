"""The agent's shutdown paths leave nothing behind: no task pending, no async generator closed while
it runs, no token thread still going.

Before, a hub going away left each agent's gRPC request-stream task waiting on a queue nobody fed;
the garbage collector later destroyed it pending, and closing its generator then raised "aclose():
asynchronous generator is already running" in a task whose exception nobody retrieved. Here the hub
goes away under a connected agent, the collector runs, a second hub takes over, and the agent is
stopped in the middle of a work. The module runs as `asyncio_strict` (tests/conftest.py): loop
debug, warnings as errors, and any error asyncio logs fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from pathlib import Path

import pytest

from edge_agent.agent import Agent, AgentConfig
from edge_agent.pacing import floor_pacer
from models.runtime import load
from models.serving import ServedModel
from tandem import AsyncClient
from tandem.errors import TandemError
from tests.hubkit import running_hub, tiny_llama, wait_for

TPOT_MS = 50  # slow enough that the stop comes in the middle of a work


def _others() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]


def _unhandled(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


async def test_agent_leaves_nothing_behind_across_a_hub_restart_and_a_stop_mid_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    engine = ServedModel("tiny", load(tiny_llama(tmp_path), use_cache=False))
    engine.pacer = floor_pacer(None, TPOT_MS)
    stop = asyncio.Event()
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        port = hub.port
        config = AgentConfig(hub=hub.address, profile="cpu-2core", state_dir=tmp_path / "agent",
                             token=hub.registry.create_token(), backoff_max_s=0.5)  # fmt: skip
        agent = Agent(config, engine)
        task = asyncio.create_task(agent.run(stop))
        await wait_for(lambda: len(hub.fleet.online()) == 1, timeout=20)
    await wait_for(lambda: not agent.connected.is_set(), timeout=10)  # the hub is gone
    gc.collect()  # what the lost channel left, collected while the loop runs
    await asyncio.sleep(0.2)
    assert _unhandled(caplog) == []

    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none", listen=f"127.0.0.1:{port}") as hub:
        await wait_for(lambda: len(hub.fleet.online()) == 1, timeout=20)
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            got = 0

            async def consume() -> None:
                nonlocal got
                with contextlib.suppress(TandemError):  # the agent stops under it
                    async for _ in client.stream("the cat", max_tokens=200):
                        got += 1

            reader = asyncio.create_task(consume())
            await wait_for(lambda: got >= 3, timeout=20)
            stop.set()
            await asyncio.wait_for(task, 10)
            assert agent.pending == 0
            await asyncio.wait_for(reader, 10)
    await wait_for(lambda: not any(t.name == "token-stream" for t in threading.enumerate()), timeout=5)
    await asyncio.sleep(0.1)
    gc.collect()
    assert _others() == []
    assert _unhandled(caplog) == []
