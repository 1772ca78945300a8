"""What protects the hub and its agents: work held at the hub beyond an agent's advertised slots, the
in-flight limit and the per-key rate limit, each answered with RESOURCE_EXHAUSTED / 429 and a Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import httpx
import pytest

from cloud_hub.errors import Overloaded, RateLimited, Unavailable
from cloud_hub.fleet import AgentSession, Fleet, _agent_error
from cloud_hub.hub_requests import Limits
from cloud_hub.placements import EdgeModels, SourceContext
from cloud_hub.ratelimit import RateLimiter
from cloud_hub.store import DeviceRecord
from edge_agent.pacing import floor_pacer
from models.runtime import load
from models.serving import ServedModel
from tandem import AsyncClient
from tandem import Overloaded as SdkOverloaded
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tandem_cli import hub as hub_cli
from tandem_cli.main import build_parser
from tests.hubkit import RunningAgent, running_hub, start_served_agent, tiny_llama, wait_for

GENERATE = "the cat"


# -- work held at the hub ------------------------------------------------------------------------------


def _session(max_concurrency: int) -> AgentSession:
    return AgentSession(DeviceRecord("dev", "dev", "cpu-2core", "x"), (), max_concurrency)


def _sent(s: AgentSession) -> list[str]:
    """What the hub has put on the wire since last asked: work ids, and "cancel:<id>"."""
    out = []
    while not s.outbox.empty():
        msg = s.outbox.get_nowait()
        out.append(msg.work.work_id if msg.WhichOneof("kind") == "work" else f"cancel:{msg.cancel.work_id}")
    return out


async def _replies(s: AgentSession, work_id: str) -> list[object]:
    return [item async for _, item in s.run(pb.Work(work_id=work_id))]


def _done(s: AgentSession, work_id: str, ttft_ms: float = 5.0) -> None:
    done = pb.WorkDone(work_id=work_id, finish_reason="length", metrics=pb.Metrics(ttft_ms=ttft_ms))
    s.deliver(pb.AgentMessage(done=done), time.perf_counter())


async def test_the_hub_sends_an_agent_no_more_than_its_slots_and_holds_the_rest() -> None:
    s = _session(max_concurrency=2)
    callers = {f"w{i}": asyncio.create_task(_replies(s, f"w{i}")) for i in range(5)}
    await asyncio.sleep(0)
    assert _sent(s) == ["w0", "w1"] and s.running == {"w0", "w1"} and s.waiting == 3
    callers["w2"].cancel()  # its caller goes away while it is held: it is never sent
    await asyncio.sleep(0.05)  # w3 waits this long for a slot
    _done(s, "w0")
    assert _sent(s) == ["w3"] and s.waiting == 1
    callers["w1"].cancel()  # a running work's caller goes away: Cancel, and its slot goes to the next
    await asyncio.sleep(0)
    assert _sent(s) == ["cancel:w1", "w4"] and s.running == {"w3", "w4"} and s.waiting == 0
    _done(s, "w3", ttft_ms=5.0)
    _done(s, "w4", ttft_ms=5.0)
    (w0,), (w3,), (w4,) = [await callers[w] for w in ("w0", "w3", "w4")]
    # The wait for a slot is the device's queueing: it is in the TTFT the hub relays, and only there.
    assert w0.metrics.ttft_ms == 5.0
    assert w3.metrics.ttft_ms >= 5.0 + 50.0 and w4.metrics.ttft_ms >= 5.0 + 50.0
    assert s.running == set() and not s.works and _sent(s) == []


async def test_held_work_whose_callers_left_does_not_pile_up() -> None:
    s = _session(max_concurrency=1)
    running = asyncio.create_task(_replies(s, "long"))
    for round_ in range(20):  # callers that come and go while one long request runs
        callers = [asyncio.create_task(_replies(s, f"{round_}.{i}")) for i in range(50)]
        await asyncio.sleep(0)
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
    assert len(s.held) <= 8 + 2 * len(s.works) and s.waiting == 0
    _done(s, "long")
    await running
    assert _sent(s) == ["long"] and s.running == set()


async def test_held_work_fails_over_when_the_session_ends() -> None:
    s = _session(max_concurrency=1)
    first, held = asyncio.create_task(_replies(s, "a")), asyncio.create_task(_replies(s, "b"))
    await asyncio.sleep(0)
    s.close()
    for caller in (first, held):
        with pytest.raises(Unavailable):
            await caller
    assert s.waiting == 0 and s.running == set()


def test_the_router_sees_held_work_as_rounds_ahead(tmp_path: Path) -> None:
    info = pb.ModelInfo(**ServedModel("tiny", load(tiny_llama(tmp_path), use_cache=False), warmup=False).info)
    s = AgentSession(DeviceRecord("dev", "dev", "cpu-2core", "x"), (info,), max_concurrency=2)
    fleet = Fleet()
    fleet.attach(s)
    edge = EdgeModels(SourceContext(fleet))
    for inflight, rounds in ((0, 0), (1, 0), (2, 1), (5, 2)):
        s.inflight = inflight  # routed here: running, held at the hub, or on their way
        assert [c.queued for c in edge.candidates("tiny", chat=False)] == [rounds]


def test_an_agent_reporting_resource_exhausted_is_overloaded_not_rate_limited() -> None:
    err = _agent_error(pb.WorkError(work_id="w", code="RESOURCE_EXHAUSTED", message="busy"))
    assert type(err) is Overloaded and err.retry_after == "1"


# -- the limits --------------------------------------------------------------------------------------


def test_token_buckets_refill_per_key_and_stay_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 3, max_keys=4, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert limiter.take("a") == pytest.approx(0.5)  # one token every 1/2 s
    assert limiter.take("b") == 0.0  # each key its own bucket
    now[0] = 0.5
    assert limiter.take("a") == 0.0 and limiter.take("a") == pytest.approx(0.5)
    now[0] = 100.0  # a long pause refills no more than the burst
    assert [limiter.take("a") for _ in range(4)][-1] == pytest.approx(0.5)
    for key in ("c", "d", "e"):  # past max_keys the oldest half goes: it starts full again
        limiter.take(key)
    assert limiter.take("a") == 0.0
    with pytest.raises(ValueError):
        RateLimiter(1.0, 0.5)


def test_limits_and_their_retry_after() -> None:
    assert Limits().rate_limiter() is None
    assert Limits(rate_per_s=2.5).rate_limiter().burst == 3  # one second's worth, rounded up
    assert Limits(rate_per_s=0.2).rate_limiter().burst == 1
    assert Limits(rate_per_s=1, rate_burst=7).rate_limiter().burst == 7
    with pytest.raises(ValueError, match="max_inflight"):
        Limits(max_inflight=-1)
    assert [Overloaded("x", s).retry_after for s in (0.0, 0.2, 1.0, 2.1)] == ["1", "1", "1", "3"]
    assert ("retry-after", "3") in RateLimited("x", 2.5).metadata()


def test_hub_up_flags_set_the_limits() -> None:
    args = build_parser().parse_args(["hub", "up", "--max-inflight", "2", "--rate-limit", "5", "--rate-burst", "10"])
    assert hub_cli._hub_config(args).limits == Limits(max_inflight=2, rate_per_s=5.0, rate_burst=10)
    assert hub_cli._hub_config(build_parser().parse_args(["hub", "up"])).limits == Limits()
    for bad in (["--max-inflight", "-1"], ["--rate-limit", "nan"], ["--rate-burst", "1.5"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["hub", "up", *bad])


async def _start_paced_agent(hub, model: Path, state_dir: Path, tpot_ms: float) -> RunningAgent:
    served = ServedModel("tiny", load(model, use_cache=False), pacer=floor_pacer(None, tpot_ms))
    return await start_served_agent(hub, served, state_dir, "slow")


async def test_max_inflight_answers_resource_exhausted_and_429_with_retry_after(tmp_path: Path) -> None:
    model = tiny_llama(tmp_path)
    async with running_hub(
        tmp_path / "hub", cloud_model=None, mqtt="none", http_listen="127.0.0.1:0", limits=Limits(max_inflight=2)
    ) as hub:
        key = hub.registry.create_api_key("t")
        ra = await _start_paced_agent(hub, model, tmp_path / "agent", tpot_ms=50)
        async with grpc.aio.insecure_channel(hub.address) as channel, httpx.AsyncClient(timeout=30) as http:
            stub, md = pb_grpc.InferenceStub(channel), (("authorization", f"Bearer {key}"),)
            request = pb.GenerateRequest(input=pb.Input(prompt=GENERATE), sampling=pb.Sampling(max_tokens=100))
            calls = [stub.Generate(request, metadata=md) for _ in range(2)]
            for call in calls:
                await call.read()  # Started: both admitted, one on the agent and one held at the hub
            assert hub.service.inflight == 2
            third = stub.Generate(request, metadata=md)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await third.read()
            trailing = dict(info.value.trailing_metadata() or ())
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in info.value.details()
            assert trailing["retry-after"] == "1" and trailing["x-tandem-error"] == "overloaded"
            async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
                with pytest.raises(SdkOverloaded) as sdk:
                    await client.generate(GENERATE, max_tokens=2)
                assert sdk.value.retry_after_s == 1.0
            body = {"model": "tiny", "prompt": GENERATE, "max_tokens": 2}
            r = await http.post(f"http://{hub.http_address}/v1/completions", json=body,
                                headers={"authorization": f"Bearer {key}"})  # fmt: skip
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "overloaded"
            for call in calls:
                call.cancel()
            await wait_for(lambda: hub.service.inflight == 0, timeout=5)
            async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
                assert (await client.generate(GENERATE, max_tokens=2)).completion_tokens == 2
        await ra.close()


async def test_rate_limit_per_key_answers_resource_exhausted_and_429_with_retry_after(tmp_path: Path) -> None:
    limits = Limits(rate_per_s=0.5, rate_burst=2)  # a token every 2 s
    async with running_hub(
        tmp_path / "hub", cloud_model=str(tiny_llama(tmp_path)), mqtt="none", http_listen="127.0.0.1:0", limits=limits
    ) as hub:
        key, other = hub.registry.create_api_key("a"), hub.registry.create_api_key("b")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client, httpx.AsyncClient(timeout=30) as http:
            for _ in range(2):  # the burst
                assert (await client.generate(GENERATE, max_tokens=1)).completion_tokens == 1
            async with grpc.aio.insecure_channel(hub.address) as channel:
                call = pb_grpc.InferenceStub(channel).Generate(
                    pb.GenerateRequest(input=pb.Input(prompt=GENERATE)), metadata=(("authorization", f"Bearer {key}"),)
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
            trailing = dict(info.value.trailing_metadata() or ())
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate" in info.value.details()
            assert trailing["x-tandem-error"] == "rate_limited" and trailing["retry-after"] in ("1", "2")
            with pytest.raises(SdkOverloaded) as sdk:
                await client.generate(GENERATE, max_tokens=1)
            assert sdk.value.retry_after_s in (1.0, 2.0)
            url = f"http://{hub.http_address}/v1/completions"
            body = {"model": "auto", "prompt": GENERATE, "max_tokens": 1}
            r = await http.post(url, json=body, headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 429 and r.headers["retry-after"] in ("1", "2")
            assert r.json()["error"]["type"] == "rate_limited"
            async with AsyncClient(hub.address, api_key=other, timeout=30) as client_b:  # another key, its own bucket
                assert (await client_b.generate(GENERATE, max_tokens=1)).completion_tokens == 1
            await asyncio.sleep(float(r.headers["retry-after"]) + 0.1)
            assert (await client.generate(GENERATE, max_tokens=1)).completion_tokens == 1
            metrics = (await http.get(f"http://{hub.http_address}/metrics")).text
        assert 'tandem_requests_total{outcome="rate_limited",placement="none"} 3.0' in metrics
