"""End to end with the real SmolLM2: hub, managed broker, one agent, the SDK and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.agent import Agent, AgentConfig
from models.serving import ServedModel
from tandem import AsyncClient, Budget
from tests.conftest import real_model
from tests.hubkit import ROOT, needs_mosquitto, running_hub, wait_for

pytestmark = [pytest.mark.real, needs_mosquitto]


async def test_chat_through_the_hub_on_an_edge_agent(tmp_path: Path) -> None:
    import asyncio

    loaded = real_model("smollm2-135m-instruct")
    async with running_hub(tmp_path / "hub", cloud_model=None) as hub:
        key = hub.registry.create_api_key("e2e")
        config = AgentConfig(
            hub=hub.address,
            profile="raspberry-pi-5",
            state_dir=tmp_path / "agent",
            name="pi",
            token=hub.registry.create_token(),
        )
        agent = Agent(config, ServedModel("smollm2-135m-instruct", loaded))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await wait_for(lambda: agent.creds is not None and hub.fleet.status_of(agent.creds.device_id) == "online", 30)
        async with AsyncClient(hub.address, api_key=key, timeout=60) as client:
            result = await client.generate(
                [{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=16,
                budget=Budget(ttft_ms=5000),
            )
        assert "Paris" in result.text
        assert result.finish_reason == "eos"
        assert result.placement is not None and result.placement.device_id == agent.creds.device_id
        assert result.placement.profile == "raspberry-pi-5"
        listing = await asyncio.to_thread(  # the hub runs on this event loop: do not block it
            subprocess.run,
            [sys.executable, "-m", "tandem_cli", "devices", "list", "--hub", hub.address, "--api-key", key],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )
        row = next(line for line in listing.stdout.splitlines() if agent.creds.device_id in line)
        assert "pi" in row and "raspberry-pi-5" in row and "online" in row and "smollm2-135m-instruct" in row
        stop.set()
        await asyncio.wait_for(task, 10)
