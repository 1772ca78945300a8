"""TLS one flag away: a private CA from `tandem hub init`, the hub serving TLS, agents and SDK trusting it."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from cloud_hub.pki import init_pki
from edge_agent.agent import Agent, AgentConfig
from models.runtime import load
from models.serving import ServedModel
from tandem import AsyncClient, Unavailable
from tandem_cli.main import main as cli
from tests.hubkit import running_hub, tiny_llama, wait_for


def test_init_writes_private_keys_and_refuses_to_overwrite(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "tls", ["127.0.0.1", "hub.example"])
    for key in ("ca.key", "hub.key"):
        assert stat.S_IMODE(paths[key].stat().st_mode) == 0o600
    assert b"BEGIN CERTIFICATE" in paths["hub.pem"].read_bytes()
    with pytest.raises(FileExistsError, match="already has a CA"):
        init_pki(tmp_path / "tls", ["127.0.0.1"])
    assert cli(["hub", "init", "--data-dir", str(tmp_path)]) == 2  # the CLI says so too


async def test_hub_over_tls_serves_agents_and_clients_that_trust_its_ca(tmp_path: Path) -> None:
    tls = tmp_path / "hub" / "tls"
    paths = init_pki(tls, ["127.0.0.1"])
    other = init_pki(tmp_path / "other", ["127.0.0.1"])  # a different deployment's CA
    model = tiny_llama(tmp_path)
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none", tls_dir=tls) as hub:
        config = AgentConfig(
            hub=hub.address,
            profile="cpu-2core",
            state_dir=tmp_path / "agent",
            name="tls-agent",
            token=hub.registry.create_token(),
            tls_ca=paths["ca.pem"],
        )
        agent, stop = Agent(config, ServedModel("tiny", load(model, use_cache=False))), asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await wait_for(lambda: len(hub.fleet.online()) == 1, timeout=20)
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=10, tls_ca=str(paths["ca.pem"])) as client:
            result = await client.generate("the cat", model="tiny", max_tokens=4)
            assert result.completion_tokens == 4 and result.placement.kind == "edge"
        for bad in (None, str(other["ca.pem"])):  # plaintext, or a CA the hub's certificate is not from
            async with AsyncClient(hub.address, api_key=key, timeout=5, tls_ca=bad) as client:
                with pytest.raises(Unavailable):
                    await client.generate("the cat", model="tiny", max_tokens=2)
        stop.set()
        await asyncio.wait_for(task, 10)
