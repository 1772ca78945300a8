"""Failover mid-stream: kill the agent's process while it streams; the caller still gets one answer.

The hub's cloud model has the same weights as the agent, and decoding is greedy, so the answer
must equal an uninterrupted run token for token. `make test` kills 3 times; `make test-slow` 20.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tandem import AsyncClient
from tandem.types import GenerateResult
from tests.hubkit import kill, needs_mosquitto, running_hub, spawn_agent, tiny_llama, wait_for

pytestmark = needs_mosquitto
MAX_TOKENS, KILL_AFTER, DEADLINE_S = 40, 5, 60.0


async def _kill_mid_stream(rounds: int, tmp_path: Path) -> None:
    model = str(tiny_llama(tmp_path))
    async with running_hub(tmp_path / "hub", cloud_model=model) as hub:
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=DEADLINE_S) as client:
            reference = await client.generate("the cat", model=model, max_tokens=MAX_TOKENS)
            assert reference.placement is not None and reference.placement.kind == "cloud"
            for i in range(rounds):
                proc = spawn_agent(hub, model, tmp_path / f"agent{i}", f"victim{i}", extra=("--pace-tpot-ms", "40"))
                try:
                    await wait_for(lambda n=f"victim{i}": any(s.record.name == n for s in hub.fleet.online()), 60)
                    result, got, start = GenerateResult(), 0, time.monotonic()
                    async for _ in client.stream("the cat", model=model, max_tokens=MAX_TOKENS, result=result):
                        got += 1
                        if got == KILL_AFTER:
                            kill(proc)
                    took = time.monotonic() - start
                finally:
                    kill(proc)
                assert took < DEADLINE_S
                assert [p.kind for p in result.placements] == ["edge", "cloud"], f"round {i}"
                assert result.token_ids == reference.token_ids, f"round {i}"
                assert result.text == reference.text
                assert result.completion_tokens == MAX_TOKENS and result.finish_reason == reference.finish_reason


async def test_kill_agent_mid_stream_3_times(tmp_path: Path) -> None:
    await _kill_mid_stream(3, tmp_path)


@pytest.mark.slow
async def test_kill_agent_mid_stream_20_times(tmp_path: Path) -> None:
    await _kill_mid_stream(20, tmp_path)
