"""The hub's own model serves one request at a time: a request that waited for it reports the wait
as queueing, not as prefill, so the cloud's (and a split's) corrections do not learn it as slowness."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tandem import AsyncClient
from tests.conftest import real_model
from tests.hubkit import running_hub

MODEL = "smollm2-135m-instruct"


async def test_a_request_that_waited_for_the_hubs_model_reports_the_wait_as_queueing(tmp_path: Path) -> None:
    real_model(MODEL, "source")
    async with running_hub(tmp_path / "hub", cloud_model=MODEL, mqtt="none") as hub:
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key) as client:
            prompt = "Write about the history of the Python language."
            await client.generate(prompt, model=MODEL, max_tokens=2, device="cloud")  # warm
            first, second = await asyncio.gather(
                client.generate(prompt, model=MODEL, max_tokens=40, device="cloud"),
                client.generate(prompt, model=MODEL, max_tokens=40, device="cloud"),
            )
    waited, ran = sorted((first, second), key=lambda r: r.queue_ms, reverse=True)
    busy = ran.ttft_ms + (ran.completion_tokens - 1) * ran.tpot_ms  # what the one ahead of it took
    assert ran.queue_ms < 0.2 * busy
    assert waited.queue_ms > 0.6 * busy, (waited.queue_ms, busy)
    # its prefill is its own: the first token's time after it got the model
    assert waited.prefill_ms < waited.ttft_ms - 0.9 * waited.queue_ms
    assert abs(waited.prefill_ms - ran.prefill_ms) < 0.5 * busy
