"""Fuzz the hub's three ways in (HTTP, gRPC, the telemetry ingest): no crash, no traceback, only the
allowed codes, and every planted hostile value refused with a message that names its field.

The hub runs in its own thread (its own event loop, a managed Mosquitto when one is installed);
blocking clients drive it. Two sources of input:
- hypothesis strategies, 1,000 HTTP bodies and 1,000 gRPC requests, which shrink a failure to its
  smallest input;
- `tests/fuzzgen.py`'s seeded generators (surrogates, NULs, huge and negative numbers, ids outside
  the vocabulary, truncated frames, random bytes; see there for what each case must get). The
  default suite draws SAMPLE of each channel; the `slow` target `test_fuzz_100k` draws 100,000.
Afterwards the hub must be SERVING and answer normally, and its log must hold no traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_hub.broker import find_mosquitto
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tests import fuzzgen
from tests.hubkit import running_hub, tiny_llama

EXAMPLES = 1000
SAMPLE = 300
"""Cases of each channel the default suite draws from tests/fuzzgen.py."""
AT_SCALE = {"http": 35_000, "grpc": 35_000, "telemetry": 30_000}
"""What test_fuzz_100k draws."""
OK_HTTP = {200, 400, 401, 404, 413, 422, 429, 503}
OK_GRPC = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}
GENERATE = "/tandem.v1.Inference/Generate"
CLIENTS = 8
"""Callers at once: an answer's network round trip overlaps the others' work."""


class TracebackLog(logging.Handler):
    """Every record logged with a traceback, from any logger (uvicorn's do not reach the root)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            self.records.append(record)

    def shown(self) -> str:
        return "\n".join(logging.Formatter().format(r) for r in self.records[:3])


class HubThread:
    """A hub serving from a background thread until stopped, with a managed broker when Mosquitto is
    installed."""

    def __init__(self, data_dir: Path, model: str) -> None:
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.mqtt = "managed" if find_mosquitto() is not None else "none"
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main(data_dir, model)), daemon=True)

    async def _main(self, data_dir: Path, model: str) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with running_hub(
            data_dir, cloud_model=model, mqtt=self.mqtt, http_listen="127.0.0.1:0", max_body_bytes=64 * 1024
        ) as hub:
            self.hub, self.key = hub, hub.registry.create_api_key("fuzz")
            self.ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[[], object]) -> object:
        """fn() run in the hub's loop, as the hub's own code runs."""

        async def run() -> object:
            return fn()

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def __enter__(self) -> HubThread:
        self.thread.start()
        assert self.ready.wait(60), "hub did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def hub_log() -> Iterator[TracebackLog]:
    handler = TracebackLog()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, hub_log: TracebackLog) -> Iterator[HubThread]:
    folder = tmp_path_factory.mktemp("fuzz")
    with HubThread(folder / "hub", str(tiny_llama(folder))) as h:
        yield h
    assert not hub_log.records, hub_log.shown()  # stopping too


# -- hypothesis ----------------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates too
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "robot", "", "\ud800"]),
        "content": st.one_of(texts, st.integers()),
    }
)
chat_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["auto", "", "gpt-9", "tandem", "\udfff"]), "messages": st.lists(message, max_size=3)},
    optional={
        "max_tokens": st.one_of(st.integers(-5, 40), st.floats(), st.text(max_size=3)),
        "temperature": st.one_of(st.floats(-1, 3), st.floats(allow_nan=True)),
        "top_p": st.floats(-1, 2),
        "stop": st.one_of(texts, st.lists(texts, max_size=3)),
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
completion_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["auto", ""]), "prompt": st.one_of(texts, st.lists(st.integers(-5, 2**33), max_size=6))},
    optional={"max_tokens": st.integers(-(2**70), 2**70)},
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.one_of(chat_body, completion_body, json_values, st.binary(max_size=200)),
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


# -- tests/fuzzgen.py's cases --------------------------------------------------------------------


@dataclass
class Tally:
    """Answers by code, and the first few that broke a rule."""

    sent: int = 0
    codes: Counter = field(default_factory=Counter)
    bad: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    """Time each channel took."""

    def check(self, case: fuzzgen.Case, code: object, allowed: set, ok: object, refused: object, message: str) -> None:
        """`refused`: the code a planted case must get; `message`: what the hub said (or "")."""
        self.sent += 1
        self.codes[code] += 1
        if code not in allowed:
            why = "a code outside the allowed ones"
        elif case.expect == fuzzgen.OK and code != ok:
            why = "refused a request it must serve"
        elif case.expect not in (None, fuzzgen.OK) and (code != refused or not message.startswith(case.expect)):
            why = f"not a refusal naming {case.expect!r}"
        else:
            return
        self.bad += 1
        if len(self.failures) < 10:
            self.failures.append(f"{why}: {code} {message[:200]!r} for {case.payload[:200]!r}")


def drive_http(h: HubThread, cases: Iterable[fuzzgen.Case], tally: Tally) -> None:
    local, clients = threading.local(), []

    def post(case: fuzzgen.Case) -> tuple[int, str]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=f"http://{h.hub.http_address}", timeout=30)
            clients.append(local.client)
        headers = {"content-type": "application/json"}
        if case.auth:
            headers["authorization"] = f"Bearer {h.key}"
        r = local.client.post(case.path, content=case.payload, headers=headers)
        return r.status_code, _error_message(r)

    try:
        _concurrently(post, cases, tally, OK_HTTP, 200, 400)
    finally:
        for client in clients:
            client.close()


def _error_message(r: httpx.Response) -> str:
    """The message of an OpenAI-style error body; "" for a 200, the whole body for anything else."""
    if r.status_code == 200:
        return ""
    try:
        error = r.json()["error"]
        if set(error) == {"message", "type", "param", "code"}:
            return error["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return f"not an OpenAI error body: {r.text[:300]}"


def drive_grpc(h: HubThread, cases: Iterable[fuzzgen.Case], tally: Tally) -> None:
    with grpc.insecure_channel(h.hub.address) as channel:
        generate = channel.unary_stream(GENERATE, response_deserializer=pb.GenerateResponse.FromString)

        def call(case: fuzzgen.Case) -> tuple[grpc.StatusCode, str]:
            metadata = (("authorization", f"Bearer {h.key}"),) if case.auth else ()
            try:
                for _ in generate(case.payload, metadata=metadata, timeout=30):
                    pass
            except grpc.RpcError as exc:
                return exc.code(), exc.details() or ""
            return grpc.StatusCode.OK, ""

        _concurrently(call, cases, tally, OK_GRPC, grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)


def _concurrently(send: Callable, cases: Iterable[fuzzgen.Case], tally: Tally, *codes: object) -> None:
    """send(case) -> (code, message) from CLIENTS threads, each answer checked by tally.check(case,
    code, *codes, message) as it comes, in order."""
    with ThreadPoolExecutor(CLIENTS) as pool:
        for batch in _batched(cases, 1000):  # a batch in flight at a time: 100,000 cases are not held at once
            for case, (code, message) in zip(batch, pool.map(send, batch), strict=True):
                tally.check(case, code, *codes, message)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    """Lists of n items (itertools.batched from Python 3.12)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def drive_telemetry(h: HubThread, payloads: list[bytes], tally: Tally, timeout_s: float = 120.0) -> None:
    """Publish `payloads` as an enrolled device's telemetry; the ingest must count every one, drop
    exactly those `fuzzgen.telemetry_accepts` refuses, and take a normal sample afterwards."""
    mqtt = pytest.importorskip("paho.mqtt.client")
    token = h.call(h.hub.registry.create_token)
    creds = h.call(lambda: h.hub.registry.enroll(token, "fuzz-device", "cpu-2core", [], False)).mqtt
    ingest = h.hub.ingest
    received, malformed = ingest.received, ingest.malformed
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(creds.username, creds.password)
    client.connect(creds.host, creds.port)
    client.loop_start()
    try:
        topic = f"{creds.topic_prefix}/telemetry"
        for payload in payloads:
            client.publish(topic, payload, qos=1).wait_for_publish(timeout_s)
        client.publish(topic, json.dumps({"load": 0.25}), qos=1).wait_for_publish(timeout_s)
        deadline = time.monotonic() + timeout_s
        while ingest.received - received < len(payloads) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    refused = sum(not fuzzgen.telemetry_accepts(p) for p in payloads)
    tally.sent += len(payloads)
    tally.codes["ingested"] += ingest.received - received
    tally.codes["malformed"] += ingest.malformed - malformed
    got = (ingest.received - received, ingest.malformed - malformed, h.hub.fleet.telemetry[creds.username].load)
    if got != (len(payloads) + 1, refused, 0.25):
        tally.bad += 1
        tally.failures.append(f"telemetry: ingested, malformed, last load {got}; sent {len(payloads)} + 1, {refused}")


def drive_all(h: HubThread, counts: dict[str, int], seed: int) -> Tally:
    rng = random.Random(seed)
    model, vocab = h.hub.service.cloud.model_info().name, _vocab(h)
    tally = Tally()
    start = time.monotonic()
    drive_http(h, (fuzzgen.http_case(rng, model, vocab) for _ in range(counts["http"])), tally)
    tally.seconds["http"], start = time.monotonic() - start, time.monotonic()
    drive_grpc(h, (fuzzgen.grpc_case(rng, model, vocab) for _ in range(counts["grpc"])), tally)
    tally.seconds["grpc"], start = time.monotonic() - start, time.monotonic()
    if h.mqtt == "managed":
        drive_telemetry(h, [fuzzgen.telemetry_payload(rng) for _ in range(counts["telemetry"])], tally)
        tally.seconds["telemetry"] = time.monotonic() - start
    return tally


def _vocab(h: HubThread) -> int:
    return json.loads(h.hub.service.cloud.model_info().config_json)["vocab_size"]


def test_fuzzgen_sample(hub: HubThread, hub_log: TracebackLog) -> None:
    tally = drive_all(hub, {"http": SAMPLE, "grpc": SAMPLE, "telemetry": SAMPLE}, seed=0)
    print(f"{tally.sent} inputs: {dict(tally.codes)}; seconds {tally.seconds}")
    assert tally.bad == 0, "\n".join(tally.failures)
    assert not hub_log.records, hub_log.shown()


@pytest.mark.slow
def test_fuzz_100k(hub: HubThread, hub_log: TracebackLog) -> None:
    start = time.monotonic()
    tally = drive_all(hub, AT_SCALE, seed=15)
    took = time.monotonic() - start
    print(
        f"{tally.sent} inputs in {took:.0f} s ({tally.sent / took:.0f}/s): {dict(tally.codes)}; seconds {tally.seconds}"
    )
    assert tally.sent >= 100_000 or hub.mqtt != "managed"
    assert tally.bad == 0, f"{tally.bad} broke a rule:\n" + "\n".join(tally.failures)
    assert not hub_log.records, hub_log.shown()


def test_hub_is_healthy_after_fuzzing(hub: HubThread, hub_log: TracebackLog) -> None:
    with grpc.insecure_channel(hub.hub.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tandem.v1.Inference"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        req = pb.GenerateRequest(input=pb.Input(prompt="the cat"), sampling=pb.Sampling(max_tokens=3))
        answers = list(pb_grpc.InferenceStub(channel).Generate(req, metadata=(("authorization", f"Bearer {hub.key}"),)))
    assert answers[-1].metrics.completion_tokens == 3
    with httpx.Client(base_url=f"http://{hub.hub.http_address}", timeout=30) as client:
        body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {hub.key}"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert client.get("/metrics").status_code == 200
    assert not hub_log.records, hub_log.shown()
