"""Split inference over real gRPC: agents run the first layers, the hub the rest (cloud_hub.split,
edge_agent.stage), and the answer is the unsplit model's, token for token."""

from __future__ import annotations

from pathlib import Path

import pytest

import edge_agent.stage
from models.runtime import load
from models.serving import ServedModel
from tandem import AsyncClient
from tests.conftest import real_model
from tests.hubkit import running_hub, start_served_agent

MODEL = "smollm2-135m-instruct"
PROMPT = "The history of the Python programming language begins in"


async def test_split_over_grpc_equals_unsplit(tmp_path: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=MODEL, mqtt="none") as hub:
        real_model(MODEL, "source")  # skips (or fails under make test) without the weights
        # each agent its own copy: a stage owns its model's KV caches while it runs
        agents = [
            await start_served_agent(hub, ServedModel(MODEL, load(MODEL, quant="source")), tmp_path / n, n)
            for n in ("a", "b")
        ]
        a, b = (x.device_id for x in agents)
        key = hub.registry.create_api_key("t")
        try:
            async with AsyncClient(hub.address, api_key=key) as client:

                async def run(device: str):  # type: ignore[no-untyped-def]
                    return await client.generate(PROMPT, model=MODEL, max_tokens=24, device=device)

                whole = await run("cloud")
                assert [p.kind for p in whole.placements] == ["cloud"]
                n_layers = 30
                for device, ranges in [
                    (f"split:{a}:1", [(0, 1), (1, n_layers)]),
                    (f"split:{a}:8", [(0, 8), (8, n_layers)]),
                    (f"split:{a}:15", [(0, 15), (15, n_layers)]),
                    (f"split:{a}:29", [(0, 29), (29, n_layers)]),
                    (f"split:{a}:8,{b}:20", [(0, 8), (8, 20), (20, n_layers)]),  # two agents and the hub
                ]:
                    split = await run(device)
                    assert split.text == whole.text, device
                    assert split.finish_reason == whole.finish_reason
                    assert [(p.layer_start, p.layer_end) for p in split.placements] == ranges
                    assert [p.kind for p in split.placements] == ["split"] * len(ranges)
                    assert split.placements[-1].device_id == "" and split.placements[0].device_id == a
                    assert split.energy_j > 0  # the agents' stages report theirs
                # the agents are free again: a plain request to each runs at once
                for device in (a, b):
                    plain = await run(device)
                    assert plain.text == whole.text and plain.placements[0].device_id == device
        finally:
            for x in agents:
                await x.close()


async def test_malformed_hidden_states_fail_over_and_the_hub_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=MODEL, mqtt="none") as hub:
        agent = await start_served_agent(hub, ServedModel(MODEL, real_model(MODEL, "source")), tmp_path / "a", "a")
        key = hub.registry.create_api_key("t")
        good = edge_agent.stage.hidden_message
        try:
            async with AsyncClient(hub.address, api_key=key) as client:
                whole = await client.generate(PROMPT, model=MODEL, max_tokens=12, device="cloud")
                for bad in ("shape", "dtype", "bytes"):

                    def broken(work_id, layer_end, h, dtype, bad=bad):  # type: ignore[no-untyped-def]
                        msg = good(work_id, layer_end, h, dtype)
                        if bad == "shape":
                            msg.shape[2] += 1
                        elif bad == "dtype":
                            msg.dtype = "bfloat16"
                        else:
                            msg.data = msg.data[:-2]
                        return msg

                    monkeypatch.setattr(edge_agent.stage, "hidden_message", broken)
                    result = await client.generate(
                        PROMPT, model=MODEL, max_tokens=12, device=f"split:{agent.device_id}:8"
                    )
                    # refused, failed over to a placement that works: the same answer, one stream
                    assert result.text == whole.text, bad
                    assert result.placements[0].kind == "split" and result.placements[-1].kind != "split"
                monkeypatch.setattr(edge_agent.stage, "hidden_message", good)
                again = await client.generate(PROMPT, model=MODEL, max_tokens=12, device=f"split:{agent.device_id}:8")
                assert again.text == whole.text and all(p.kind == "split" for p in again.placements)
                assert hub.service.metrics.failovers._value.get() == 3
        finally:
            await agent.close()
