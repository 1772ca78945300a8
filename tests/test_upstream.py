"""The OpenAI-compatible upstream backend, against real servers.

Default suite: another Tandem hub's OpenAI API is the upstream (a real HTTP server, same weights,
so answers must match token for token). Slow suite: llama-cpp-python's own server serving SmolLM2.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from models.chat import render_chat
from tandem import AsyncClient, Unavailable
from tests.conftest import real_model
from tests.hubkit import kill, needs_mosquitto, running_hub, spawn_agent, tiny_llama, wait_for

CHAT = [{"role": "user", "content": "the cat sat in a hat"}]


async def test_hub_on_an_openai_compatible_upstream(tmp_path: Path) -> None:
    model = str(tiny_llama(tmp_path))
    async with running_hub(tmp_path / "up", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as up:
        up_key = up.registry.create_api_key("downstream")
        async with running_hub(
            tmp_path / "hub",
            cloud_model=model,
            mqtt="none",
            cloud_backend="openai",
            cloud_upstream_url=f"http://{up.http_address}",
            cloud_upstream_key=up_key,
        ) as hub:
            key = hub.registry.create_api_key("t")
            async with (
                AsyncClient(hub.address, api_key=key, timeout=30) as via,
                AsyncClient(up.address, api_key=up_key, timeout=30) as direct,
            ):
                for prompt in (CHAT, "the cat"):
                    got = await via.generate(prompt, max_tokens=12)
                    want = await direct.generate(prompt, max_tokens=12)
                    assert got.text == want.text and got.completion_tokens == want.completion_tokens == 12
                    assert got.placement.kind == "cloud" and got.placement.model == model
                stopped = await via.generate("the cat", max_tokens=30, stop=[want.text[3:6]])
                assert stopped.text == want.text[: want.text.index(want.text[3:6])]


@needs_mosquitto
async def test_failover_from_an_edge_agent_to_the_upstream(tmp_path: Path) -> None:
    model = str(tiny_llama(tmp_path))
    async with running_hub(tmp_path / "up", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as up:
        up_key = up.registry.create_api_key("downstream")
        async with running_hub(
            tmp_path / "hub",
            cloud_model=model,
            cloud_backend="openai",
            cloud_upstream_url=f"http://{up.http_address}",
            cloud_upstream_key=up_key,
        ) as hub:
            key = hub.registry.create_api_key("t")
            async with AsyncClient(hub.address, api_key=key, timeout=60) as client:
                reference = await client.generate("the cat", model=model, max_tokens=30)
                proc = spawn_agent(hub, model, tmp_path / "agent", "victim", extra=("--pace-tpot-ms", "40"))
                try:
                    await wait_for(lambda: len(hub.fleet.online()) == 1, 60)
                    from tandem.types import GenerateResult

                    result, n = GenerateResult(), 0
                    async for _ in client.stream("the cat", model=model, max_tokens=30, result=result):
                        n += 1
                        if n == 4:
                            kill(proc)
                finally:
                    kill(proc)
                assert [p.kind for p in result.placements] == ["edge", "cloud"]
                assert result.text == reference.text and result.completion_tokens == 30


async def test_unreachable_upstream_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    model = str(tiny_llama(tmp_path))
    async with running_hub(
        tmp_path / "hub",
        cloud_model=model,
        mqtt="none",
        cloud_backend="openai",
        cloud_upstream_url=f"http://127.0.0.1:{dead}",
    ) as hub:
        async with AsyncClient(hub.address, api_key=hub.registry.create_api_key("t"), timeout=30) as client:
            with pytest.raises(Unavailable, match="unreachable"):
                await client.generate("the cat", max_tokens=4)


@pytest.mark.slow
async def test_llama_cpp_server_as_upstream(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed: make test-slow")
    loaded = real_model("smollm2-135m-instruct")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(loaded.path),
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--model_alias",
            "smollm2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "llama.cpp server did not start"
            time.sleep(0.5)
        async with running_hub(
            tmp_path / "hub",
            cloud_model="smollm2-135m-instruct",
            mqtt="none",
            cloud_backend="openai",
            cloud_upstream_url=f"http://127.0.0.1:{port}",
            cloud_upstream_model="smollm2",
            cloud_upstream_prompt="text",
        ) as hub:
            async with AsyncClient(hub.address, api_key=hub.registry.create_api_key("t"), timeout=60) as client:
                r = await client.generate(messages, max_tokens=20)
        # The hub relays the upstream's own greedy answer: llama.cpp asked directly, with the text
        # the hub sends (the chat template rendered, tokenized, BOS left to the server). Its words
        # depend on llama.cpp's kernels for this CPU, so they are compared, not spelled out here.
        tok, info = loaded.tokenizer, loaded.tokenizer.info
        bos = tok.decode([info.bos_id], skip_special_tokens=False) if info.bos_id is not None else ""
        ids = tok.encode(render_chat(info.chat_template, messages, bos_token=bos), add_bos=False)
        ids = ids[1:] if ids and info.add_bos and ids[0] == info.bos_id else ids
        body = {"model": "smollm2", "prompt": tok.decode(ids, skip_special_tokens=False), "max_tokens": 20}
        direct = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={**body, "temperature": 0.0}, timeout=60)
        assert r.placement.kind == "cloud" and r.completion_tokens == 20
        assert r.text and r.text == direct.json()["choices"][0]["text"]
    finally:
        server.terminate()
        server.wait(10)
