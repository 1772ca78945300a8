"""The OpenAI API beyond plain chat (issue 23): logprobs, echo, n, usage in the stream, response
formats and tools refused where a model cannot take them, through the unchanged `openai` client and
the SDK, on the hub's own model and on an edge agent. Logprobs are checked against the model's own
teacher-forced scores (models.generate.Generator.score)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import openai
import pytest

from models.runtime import load
from tandem import Client
from tests.hubkit import running_hub, start_agent, tiny_llama

CHAT = [{"role": "user", "content": "the cat sat in a hat"}]


@pytest.fixture
def model(tmp_path: Path) -> str:
    return str(tiny_llama(tmp_path))


def _client(hub, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{hub.http_address}/v1", api_key=key, max_retries=0, timeout=60)


def _reference(model: str, prompt_ids: list[int], k: int):
    """Teacher-forced (logprob, top-k) of each token after the first, by the model as the hub and
    agents serve it (source precision): the numbers to match."""
    return load(model, quant="source", use_cache=False).generator().score(prompt_ids, k)


async def test_chat_logprobs_match_teacher_forced_on_cloud_and_edge(tmp_path: Path, model: str) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        agent = await start_agent(hub, Path(model), tmp_path / "agent", "edge", model_name=model)
        key = hub.registry.create_api_key("t")
        client = _client(hub, key)
        gen = load(model, use_cache=False).generator()
        prompt_ids = gen.encode_prompt(CHAT)
        answers = {}
        for device in ("cloud", agent.device_id):
            answers[device] = await asyncio.to_thread(
                client.chat.completions.create, model=model, messages=CHAT, max_tokens=6, temperature=0,
                logprobs=True, top_logprobs=3, extra_body={"tandem": {"device": device}},
            )  # fmt: skip
        cloud, edge = answers["cloud"], answers[agent.device_id]
        entries = cloud.choices[0].logprobs.content
        assert len(entries) == 6 and all(len(e.top_logprobs) == 3 for e in entries)
        ids = [gen.tokenizer.encode(e.token, add_bos=False) for e in entries]  # text of each token
        assert "".join(e.token for e in entries) == cloud.choices[0].message.content
        # every generated token scored as the model scores it teacher-forced; decode steps run the
        # cached path (its own accumulation order), so they agree to about 1e-4 nats, not bit for bit
        generated = gen.tokenizer.encode(cloud.choices[0].message.content, add_bos=False)
        ref = _reference(model, prompt_ids + generated, 3)[len(prompt_ids) :]
        assert len(ids) == len(ref)
        for e, r in zip(entries, ref, strict=True):
            assert r is not None and abs(e.logprob - r.logprob) < 1e-3
            assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6  # greedy: the chosen is the most likely
            assert max(abs(t.logprob - p) for t, (_, p) in zip(e.top_logprobs, r.top, strict=True)) < 1e-3
            assert bytes(e.bytes).decode() == e.token
        # the edge agent (serving the file at fp32, the cloud at source precision) agrees
        edge_entries = edge.choices[0].logprobs.content
        assert [e.token for e in edge_entries] == [e.token for e in entries]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(edge_entries, entries, strict=True)) < 1e-3
        # stream and whole agree, token for token
        chunks = await asyncio.to_thread(
            lambda: list(client.chat.completions.create(
                model=model, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True,
                extra_body={"tandem": {"device": "cloud"}},
            ))
        )  # fmt: skip
        streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in entries]
        await agent.close()


async def test_completions_echo_logprobs_score_the_prompt(tmp_path: Path, model: str) -> None:
    """What lm-evaluation-harness's local-completions sends for a log-likelihood: token ids, echo,
    logprobs=1, max_tokens=1; the prompt's token_logprobs are the teacher-forced scores."""
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("t")
        client = _client(hub, key)
        gen = load(model, use_cache=False).generator()
        ids = gen.tokenizer.encode("the cat sat in a hat and the dog")
        out = await asyncio.to_thread(
            client.completions.create, model=model, prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True
        )
        lp = out.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = _reference(model, ids, 1)
        for got, r in zip(lp.token_logprobs[1 : len(ids)], ref[1:], strict=True):
            assert r is not None and abs(got - r.logprob) < 1e-4
        assert out.choices[0].text.startswith(gen.tokenizer.decode(ids, skip_special_tokens=False))
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        assert all(max(t.values()) >= v for t, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True))
        # a batch of prompts: one choice each, by index
        two = await asyncio.to_thread(
            client.completions.create, model=model, prompt=["the cat", "a dog"], max_tokens=3, temperature=0
        )
        assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 6


async def test_n_choices_share_the_prefill_and_stream_agrees(tmp_path: Path, model: str) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        agent = await start_agent(hub, Path(model), tmp_path / "agent", "edge", model_name=model)
        key = hub.registry.create_api_key("t")
        client = _client(hub, key)
        for device in ("cloud", agent.device_id):
            pin = {"tandem": {"device": device}}
            one = await asyncio.to_thread(
                client.chat.completions.create, model=model, messages=CHAT, max_tokens=8, temperature=0, extra_body=pin
            )
            greedy = await asyncio.to_thread(
                client.chat.completions.create, model=model, messages=CHAT, max_tokens=8, temperature=0, n=3,
                extra_body=pin,
            )  # fmt: skip
            # greedy choices after the first decode from the restored prompt cache: the same text
            assert [c.index for c in greedy.choices] == [0, 1, 2]
            assert {c.message.content for c in greedy.choices} == {one.choices[0].message.content}
            assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
            sampled = await asyncio.to_thread(
                client.chat.completions.create, model=model, messages=CHAT, max_tokens=8, temperature=1.0, seed=11,
                n=3, extra_body=pin,
            )  # fmt: skip
            texts = [c.message.content for c in sampled.choices]
            assert len(set(texts)) > 1  # sampled choices differ
            chunks = await asyncio.to_thread(
                lambda pin=pin: list(client.chat.completions.create(
                    model=model, messages=CHAT, max_tokens=8, temperature=1.0, seed=11, n=3, stream=True,
                    stream_options={"include_usage": True}, extra_body=pin,
                ))
            )  # fmt: skip
            streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                        for i in range(3)]  # fmt: skip
            assert streamed == texts  # seeded: the stream gives the same choices
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sampled.usage.completion_tokens
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert sorted(finishes) == ["length"] * 3
        await agent.close()


async def test_sdk_returns_logprobs_and_choices(tmp_path: Path, model: str) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none") as hub:
        key = hub.registry.create_api_key("t")
        gen = load(model, use_cache=False).generator()
        ids = gen.encode_prompt("the cat sat")

        def call():
            with Client(hub.address, api_key=key) as c:
                return c.generate("the cat sat", max_tokens=5, logprobs=2, prompt_logprobs=0, n=2)

        result = await asyncio.to_thread(call)
        assert len(result.choices) == 2 and result.choices[0].text == result.choices[1].text == result.text
        assert len(result.logprobs) == 5 and all(len(lp.top) == 2 for lp in result.logprobs)
        ref = _reference(model, ids + result.token_ids, 0)[len(ids) :]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(result.logprobs, ref, strict=True)) < 1e-3
        assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(ids)
        assert all(math.isfinite(p.logprob) and p.logprob <= 0 for p in result.prompt_logprobs[1:])


async def test_bad_inputs_name_their_field(tmp_path: Path, model: str) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("t")
        client = _client(hub, key)

        def chat(**kw: object) -> object:
            return client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, **kw)

        cases = [
            (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
            (dict(top_logprobs=2), "top_logprobs"),
            (dict(n=9), "n"),
            (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
            (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
             "response_format.json_schema.schema"),  # fmt: skip
            (dict(response_format={"type": "yaml"}), "response_format.type"),
            (dict(extra_body={"best_of": 2}), "best_of"),
        ]
        for kw, field in cases:
            with pytest.raises(openai.BadRequestError) as info:
                await asyncio.to_thread(chat, **kw)
            assert field in str(info.value), (kw, str(info.value))
        with pytest.raises(openai.BadRequestError, match="tools: model .* no tool support"):
            await asyncio.to_thread(chat, tools=[{"type": "function", "function": {"name": "f"}}])
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            await asyncio.to_thread(
                client.completions.create, model=model, prompt="the cat", max_tokens=2, logprobs=6
            )
