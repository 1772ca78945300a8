"""The OpenAI-compatible HTTP API, driven by the unchanged `openai` client, and /metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from tests.hubkit import running_hub, tiny_llama

CHAT = [{"role": "user", "content": "the cat sat in a hat"}]


@pytest.fixture
def model(tmp_path: Path) -> str:
    return str(tiny_llama(tmp_path))


def _client(hub, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{hub.http_address}/v1", api_key=key, max_retries=0, timeout=30)


async def test_openai_client_chat_completion_and_stream(tmp_path: Path, model: str) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("t")
        client = _client(hub, key)
        whole = await asyncio.to_thread(
            client.chat.completions.create, model=model, messages=CHAT, max_tokens=12, temperature=0
        )
        assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
        assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"

        def stream() -> tuple[str, list]:
            chunks = list(
                client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0, stream=True)
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks

        text, chunks = await asyncio.to_thread(stream)
        assert text == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "length"
        info = whole.model_extra["tandem"]
        assert info["placements"][0]["kind"] == "cloud" and info["ttft_ms"] > 0
        listed = await asyncio.to_thread(client.models.list)
        assert [m.id for m in listed.data] == [model]
        done = await asyncio.to_thread(
            client.completions.create, model="auto", prompt="the cat", max_tokens=5, temperature=0
        )
        assert done.object == "text_completion" and done.usage.completion_tokens == 5


async def test_budget_extension_and_openai_errors(tmp_path: Path, model: str) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("t")
        client = _client(hub, key)

        def call(**kw: object) -> object:
            return client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, **kw)

        with pytest.raises(openai.UnprocessableEntityError) as info:
            await asyncio.to_thread(call, extra_body={"tandem": {"budget": {"ttft_ms": 0.001}}})
        assert info.value.body["type"] == "budget_unsatisfiable" and info.value.body["param"] == "ttft_ms"
        ok = await asyncio.to_thread(call, extra_body={"tandem": {"budget": {"ttft_ms": 0.001, "best_effort": True}}})
        assert ok.usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            await asyncio.to_thread(_client(hub, "tdk_wrong").models.list)
        with pytest.raises(openai.NotFoundError, match="not served"):
            await asyncio.to_thread(client.chat.completions.create, model="gpt-9", messages=CHAT)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            await asyncio.to_thread(call, temperature=7)


async def test_malformed_and_oversized_bodies(tmp_path: Path, model: str) -> None:
    async with running_hub(
        tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0", max_body_bytes=10_000
    ) as hub:
        key = hub.registry.create_api_key("t")
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        url = f"http://{hub.http_address}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=30) as http:
            cases = [
                (b"{not json", 400),
                (b'{"model": "x", "messages": "hi"}', 400),
                (b'{"model": "x", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}', 400),
                (b'{"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', 400),
                (b'{"model": "x", "messages": []}', 400),
                (b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * 20_000 + b'"}]}', 413),
            ]
            for body, status in cases:
                r = await http.post(url, content=body, headers=headers)
                assert r.status_code == status, (body[:60], r.text)
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            r = await http.post(url, json={"model": model, "messages": CHAT, "max_tokens": 3}, headers=headers)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            metrics = (await http.get(f"http://{hub.http_address}/metrics")).text
        assert 'tandem_requests_total{outcome="ok",placement="cloud"} 1.0' in metrics
        assert "tandem_ttft_seconds_bucket" in metrics and "tandem_devices_online 0.0" in metrics


async def test_overload_answers_429_at_once(tmp_path: Path, model: str) -> None:
    from cloud_hub.hub_requests import Limits

    async with running_hub(
        tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0", limits=Limits(max_inflight=0)
    ) as hub:
        client = _client(hub, hub.registry.create_api_key("t"))
        with pytest.raises(openai.RateLimitError, match="limit"):
            await asyncio.to_thread(client.chat.completions.create, model=model, messages=CHAT, max_tokens=2)
