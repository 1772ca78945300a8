"""The OpenAI API beyond plain chat (issue 23): logprobs, echo, n, usage in the stream, response
formats and tools refused where a model cannot take them, through the unchanged `openai` client and
the SDK, on the hub's own model and on an edge agent. Logprobs are checked against the model's own
teacher-forced scores (models.generate.Generator.score)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from models.runtime import load
from tandem import Client
from tests.hubkit import running_hub, start_agent, tiny_llama

CHAT = [{"role": "user", "content": "the cat sat in a hat"}]
BAD_SCHEMA = {"type": "nope"}


@pytest.fixture
def model(tmp_path: Path) -> str:
    return str(tiny_llama(tmp_path))


_OPEN: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Each test's openai clients closed after it (their pooled sockets would otherwise be found
    unclosed by a later test's garbage collection)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def _client(hub, key: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"http://{hub.http_address}/v1", api_key=key, max_retries=0, timeout=60)
    _OPEN.append(client)
    return client


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
            deltas = [(c.choices[0].index, c.choices[0].delta.content or "") for c in chunks if c.choices]
            streamed = ["".join(text for index, text in deltas if index == i) for i in range(3)]
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
            (
                dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA}}),
                "response_format.json_schema.schema",
            ),
            (dict(response_format={"type": "yaml"}), "response_format.type"),
            (dict(extra_body={"best_of": 2}), "best_of"),
        ]
        for kw, field in cases:
            with pytest.raises(openai.BadRequestError) as info:
                await asyncio.to_thread(chat, **kw)
            assert field in str(info.value), (kw, str(info.value))
        with pytest.raises(openai.BadRequestError, match=r"tools: model .* no tool support"):
            await asyncio.to_thread(chat, tools=[{"type": "function", "function": {"name": "f"}}])
        with pytest.raises(openai.BadRequestError, match=r"prompt: 65 prompts in one request; at most 64"):
            await asyncio.to_thread(client.completions.create, model=model, prompt=["x"] * 65, max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            await asyncio.to_thread(client.completions.create, model=model, prompt="the cat", max_tokens=2, logprobs=6)


async def test_upstream_passes_logprobs_through_and_refuses_without_them(tmp_path: Path, model: str) -> None:
    """Another hub as an OpenAI upstream gives logprobs (tokens named by id, exact); a server that
    answers without them makes a request for logprobs a 400 naming the field."""
    async with running_hub(tmp_path / "up", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as up:
        async with running_hub(
            tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0", cloud_backend="openai",
            cloud_upstream_url=f"http://{up.http_address}", cloud_upstream_key=up.registry.create_api_key("down"),
        ) as hub:  # fmt: skip
            direct = _client(up, up.registry.create_api_key("t"))
            via = _client(hub, hub.registry.create_api_key("t"))
            ask = dict(model=model, prompt="the cat sat", max_tokens=5, temperature=0, logprobs=2)
            a = await asyncio.to_thread(direct.completions.create, **ask)
            b = await asyncio.to_thread(via.completions.create, **ask)
            assert b.choices[0].text == a.choices[0].text
            assert b.choices[0].logprobs.token_logprobs == pytest.approx(a.choices[0].logprobs.token_logprobs, abs=1e-6)
            with pytest.raises(openai.BadRequestError, match=r"n: .*upstream"):
                await asyncio.to_thread(via.completions.create, model=model, prompt="x", max_tokens=2, n=2)
            with pytest.raises(openai.BadRequestError, match=r"echo: .*upstream"):
                await asyncio.to_thread(via.completions.create, **{**ask, "echo": True})
            with pytest.raises(openai.BadRequestError, match=r"response_format: .*upstream"):
                await asyncio.to_thread(
                    via.completions.create, **ask, extra_body={"response_format": {"type": "json_object"}}
                )
            with pytest.raises(openai.BadRequestError, match=r"top_logprobs: .*at most 5"):
                await asyncio.to_thread(
                    via.chat.completions.create, model=model, messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=6
                )

    silent = _SilentUpstream()  # a server that streams text and never logprobs (as TGI's legacy API)
    try:
        async with running_hub(
            tmp_path / "hub2", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0", cloud_backend="openai",
            cloud_upstream_url=silent.url,
        ) as hub:  # fmt: skip
            via = _client(hub, hub.registry.create_api_key("t"))
            ok = await asyncio.to_thread(via.completions.create, model=model, prompt="x", max_tokens=2)
            assert ok.choices[0].text == "ab"
            with pytest.raises(openai.BadRequestError, match=r"logprobs: the upstream .* returned none"):
                await asyncio.to_thread(via.completions.create, model=model, prompt="x", max_tokens=2, logprobs=1)
    finally:
        silent.close()


class _SilentUpstream:
    """A minimal OpenAI-style completions server on loopback that never returns logprobs."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        frames = [{"choices": [{"index": 0, "text": t, "finish_reason": f}]} for t, f in (("a", None), ("b", "length"))]
        body = "".join(f"data: {json.dumps(f)}\n\n" for f in frames) + "data: [DONE]\n\n"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


async def test_json_schema_answers_validate_through_the_openai_client(tmp_path: Path) -> None:
    """SmolLM2 served by the hub, greedy, under a strict json_schema: whole and streamed answers are
    the same text, which parses and validates; json_object gives an object."""
    import json

    import jsonschema

    from tests.conftest import real_model

    real_model("smollm2-135m-instruct")  # skips (or fails under make test) without the weights
    model = "smollm2-135m-instruct"
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        client = _client(hub, hub.registry.create_api_key("t"))
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        ask = dict(model=model, messages=[{"role": "user", "content": "Describe a cat owner."}], max_tokens=60,
                   temperature=0, response_format=fmt)  # fmt: skip
        whole = await asyncio.to_thread(client.chat.completions.create, **ask)
        text = whole.choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)
        assert whole.choices[0].finish_reason == "stop"
        chunks = await asyncio.to_thread(lambda: list(client.chat.completions.create(stream=True, **ask)))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        anything = await asyncio.to_thread(
            client.chat.completions.create, **{**ask, "response_format": {"type": "json_object"}}
        )
        assert isinstance(json.loads(anything.choices[0].message.content), dict)


TOOL_TEMPLATE = (  # ChatML with a tools block, as Hugging Face's tool-calling templates write one
    "{% if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}, "tomorrow": {"type": "boolean"}},
            "required": ["unit", "tomorrow"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "clock", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}


async def test_forced_tool_calls_parse_for_a_model_whose_template_takes_tools(tmp_path: Path) -> None:
    """A model whose chat template renders tools: the tools reach the prompt, and with tool_choice
    required or a named function the call is grammar-constrained, so it parses into OpenAI's
    tool_calls (arguments valid against the function's parameters), whole and streamed."""
    import json

    import jsonschema

    from tests.tiny import TinySpec, write_tiny_gguf

    model = str(write_tiny_gguf(tmp_path / "tools.gguf", TinySpec(context_length=1024, chat_template=TOOL_TEMPLATE)))
    gen = load(model, use_cache=False).generator()
    with_tools = gen.encode_prompt(CHAT, [WEATHER])
    assert len(with_tools) > len(gen.encode_prompt(CHAT)) and "weather" in gen.tokenizer.decode(with_tools)
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        agent = await start_agent(hub, Path(model), tmp_path / "agent", "edge", model_name=model)
        client = _client(hub, hub.registry.create_api_key("t"))
        for device, choice in (
            ("cloud", "required"),
            (agent.device_id, {"type": "function", "function": {"name": "weather"}}),
        ):
            ask = dict(model=model, messages=CHAT, max_tokens=120, temperature=0, tools=[WEATHER, CLOCK],
                       tool_choice=choice, extra_body={"tandem": {"device": device}})  # fmt: skip
            whole = await asyncio.to_thread(client.chat.completions.create, **ask)
            c = whole.choices[0]
            assert c.finish_reason == "tool_calls" and c.message.content is None, (device, c)
            call = c.message.tool_calls[0]
            assert call.type == "function" and call.function.name in ("weather", "clock")
            if call.function.name == "weather" or choice != "required":
                assert call.function.name == "weather"
                jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
            chunks = await asyncio.to_thread(lambda ask=ask: list(client.chat.completions.create(stream=True, **ask)))
            calls = [
                tc
                for ch in chunks
                if ch.choices and ch.choices[0].delta.tool_calls
                for tc in ch.choices[0].delta.tool_calls
            ]
            assert [(t.function.name, t.function.arguments) for t in calls] == [
                (call.function.name, call.function.arguments)
            ]
            assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
                "tool_calls"
            ]
        with pytest.raises(openai.BadRequestError, match=r"tool_choice\.function\.name"):
            await asyncio.to_thread(
                client.chat.completions.create, model=model, messages=CHAT, max_tokens=8, tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )  # fmt: skip
        await agent.close()


async def test_completions_stream_with_echo_and_logprobs_agrees_with_whole(tmp_path: Path, model: str) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        client = _client(hub, hub.registry.create_api_key("t"))
        ask = dict(model=model, prompt="the cat sat in a hat", max_tokens=5, temperature=0, logprobs=2, echo=True)
        whole = await asyncio.to_thread(client.completions.create, **ask)
        chunks = await asyncio.to_thread(lambda: list(client.completions.create(stream=True, **ask)))
        parts = [c.choices[0] for c in chunks if c.choices]
        assert "".join(p.text for p in parts) == whole.choices[0].text
        lp = whole.choices[0].logprobs
        pairs = [zip(p.logprobs.tokens, p.logprobs.token_logprobs, strict=True) for p in parts if p.logprobs]
        streamed = [pair for chunk in pairs for pair in chunk]
        assert streamed == list(zip(lp.tokens, lp.token_logprobs, strict=True))
        offsets = [o for p in parts if p.logprobs for o in p.logprobs.text_offset]
        assert offsets == lp.text_offset
