"""Fuzz both APIs with thousands of random requests: no crash, only clear 4xx / status codes.

The hub runs in its own thread (its own event loop); hypothesis drives a blocking HTTP client and
a blocking gRPC stub against it. Afterwards the hub must still be healthy and answer normally.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tests.hubkit import running_hub, tiny_llama

EXAMPLES = 1000
OK_HTTP = {200, 400, 401, 404, 413, 422, 429, 503}
OK_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}


class HubThread:
    """A hub serving from a background thread until stopped."""

    def __init__(self, data_dir: Path, model: str) -> None:
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main(data_dir, model)), daemon=True)

    async def _main(self, data_dir: Path, model: str) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with running_hub(
            data_dir, cloud_model=model, mqtt="none", http_listen="127.0.0.1:0", max_body_bytes=64 * 1024
        ) as hub:
            self.hub, self.key = hub, hub.registry.create_api_key("fuzz")
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> HubThread:
        self.thread.start()
        assert self.ready.wait(60), "hub did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubThread]:
    folder = tmp_path_factory.mktemp("fuzz")
    with HubThread(folder / "hub", str(tiny_llama(folder))) as h:
        yield h


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "robot", ""]),
        "content": st.one_of(st.text(max_size=60), st.integers()),
    }
)
chat_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["auto", "", "gpt-9", "tandem"]), "messages": st.lists(message, max_size=3)},
    optional={
        "max_tokens": st.one_of(st.integers(-5, 40), st.floats(), st.text(max_size=3)),
        "temperature": st.one_of(st.floats(-1, 3), st.floats(allow_nan=True)),
        "top_p": st.floats(-1, 2),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=3), max_size=3)),
        "seed": st.integers(-(2**70), 2**70),
        "stream": st.booleans(),
        "n": st.integers(0, 3),
        "tandem": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "budget": st.dictionaries(
                        st.sampled_from(["ttft_ms", "tpot_ms", "energy_j", "best_effort", "x"]), scalars, max_size=4
                    )
                }
            ),
        ),
        "extra_field": json_values,
    },
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.one_of(chat_body, json_values, st.binary(max_size=200)),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    auth=st.booleans(),
)
def test_fuzz_http(hub: HubThread, body: object, path: str, auth: bool) -> None:
    headers = {"authorization": f"Bearer {hub.key}"} if auth else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(timeout=30) as client:
        r = client.post(f"http://{hub.hub.http_address}{path}", content=content, headers=headers)
    assert r.status_code in OK_HTTP, (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


prompts = st.one_of(
    st.builds(lambda t: pb.Input(prompt=t), st.text(max_size=80)),
    st.builds(lambda ids: pb.Input(tokens=pb.TokenIds(ids=ids)), st.lists(st.integers(0, 2**32 - 1), max_size=8)),
    st.builds(
        lambda ms: pb.Input(chat=pb.ChatMessages(messages=ms)),
        st.lists(st.builds(pb.ChatMessage, role=st.text(max_size=10), content=st.text(max_size=30)), max_size=3),
    ),
    st.just(pb.Input()),
)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
requests = st.builds(
    pb.GenerateRequest,
    model=st.sampled_from(["", "gpt-9"]),
    input=prompts,
    sampling=st.builds(
        pb.Sampling,
        max_tokens=st.integers(0, 2**32 - 1),
        temperature=floats32,
        top_k=st.integers(0, 2**32 - 1),
        top_p=floats32,
        stop=st.lists(st.text(max_size=4), max_size=2),
    ),
    budget=st.builds(
        pb.Budget,
        ttft_ms=st.floats(allow_nan=True),
        tpot_ms=st.floats(allow_nan=True),
        energy_j=st.floats(allow_nan=True),
        best_effort=st.booleans(),
    ),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests, auth=st.booleans())
def test_fuzz_grpc(hub: HubThread, request: pb.GenerateRequest, auth: bool) -> None:
    metadata = (("authorization", f"Bearer {hub.key}"),) if auth else ()
    with grpc.insecure_channel(hub.hub.address) as channel:
        try:
            for _ in pb_grpc.InferenceStub(channel).Generate(request, metadata=metadata, timeout=30):
                pass
        except grpc.RpcError as exc:
            assert exc.code() in OK_GRPC, (exc.code(), exc.details())


def test_hub_is_healthy_after_fuzzing(hub: HubThread) -> None:
    with grpc.insecure_channel(hub.hub.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tandem.v1.Inference"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        req = pb.GenerateRequest(input=pb.Input(prompt="the cat"), sampling=pb.Sampling(max_tokens=3))
        answers = list(pb_grpc.InferenceStub(channel).Generate(req, metadata=(("authorization", f"Bearer {hub.key}"),)))
    assert answers[-1].metrics.completion_tokens == 3
