"""The hub's own time and its cheap paths, in process: HubService over fake agent sessions (no gRPC).

The hub reports its own time per request (Metrics.hub_route_ms, hub_relay_ms); these tests pin what
that time must include, and check the caches that keep it small against what they replace.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cloud_hub.candidates import Candidate
from cloud_hub.errors import Unauthenticated
from cloud_hub.estimates import queued_estimate
from cloud_hub.fleet import AgentSession, Fleet, WorkQueue
from cloud_hub.hub_requests import Final, GenerateSpec, Started
from cloud_hub.metrics import HubMetrics
from cloud_hub.placements import Placements, SourceContext, make_sources
from cloud_hub.progress import Chunk
from cloud_hub.prompt import prompt_from_value
from cloud_hub.registry import Registry
from cloud_hub.router import Budget, BudgetRouter
from cloud_hub.service import HubService
from cloud_hub.servicers import spec_from_request
from cloud_hub.store import DeviceRecord, SQLiteStore
from device_profiles import load_profile
from models.errors import InvalidRequest as ModelInvalidRequest
from models.runtime import load
from models.sampling import SamplingParams
from models.serving import ServedModel
from partitioner.cost import predict
from tandem.v1 import tandem_pb2 as pb
from tests.hubkit import tiny_llama
from tests.test_cost import SMOLLM2

ENCODE_S, WAIT_S, END_WAIT_S, AUTH_S = 0.001, 0.004, 0.02, 0.03


@pytest.fixture(scope="module")
def model_info(tmp_path_factory: pytest.TempPathFactory) -> pb.ModelInfo:
    path = tiny_llama(tmp_path_factory.mktemp("tiny"))
    return pb.ModelInfo(**ServedModel("tiny", load(path, use_cache=False)).info)


class CountingStore(SQLiteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lookups = 0

    def has_api_key(self, lookup: str) -> bool:
        self.lookups += 1
        return super().has_api_key(lookup)


def session(device_id: str, info: pb.ModelInfo | None) -> AgentSession:
    models = (info,) if info is not None else ()
    return AgentSession(DeviceRecord(device_id, device_id, "cpu-2core", "x"), models)


def service(*sessions: AgentSession) -> HubService:
    fleet = Fleet()
    for s in sessions:
        fleet.attach(s)
    return HubService(fleet, Placements(make_sources(("edge", "cloud"), SourceContext(fleet))), BudgetRouter(), None)


def registry(tmp_path: Path) -> Registry:
    return Registry(CountingStore(tmp_path / "registry.db"), Fleet(), None)


async def fake_agent(s: AgentSession, wait_s: float = 0.0, end_wait_s: float = 0.0, fail_at: int = -1) -> None:
    """Serve each work: token i is id i, text "<i>"; each reply stamped as if it had waited `wait_s`
    (the WorkDone `end_wait_s`) between reaching the hub and its code. At token `fail_at`, disconnect."""
    while (msg := await s.outbox.get()) is not None:
        if msg.WhichOneof("kind") != "work":
            continue
        w, start = msg.work, len(msg.work.continue_ids)
        for i in range(start, start + w.sampling.max_tokens):
            if i == fail_at:
                s.close()
                return
            chunk = pb.TokenChunk(work_id=w.work_id, token_ids=[i], text=f"<{i}>")
            s.deliver(pb.AgentMessage(tokens=chunk), time.perf_counter() - wait_s)
            await asyncio.sleep(0)
        done = pb.WorkDone(work_id=w.work_id, finish_reason="length", metrics=pb.Metrics(prompt_tokens=3))
        s.deliver(pb.AgentMessage(done=done), time.perf_counter() - end_wait_s)


def slow_encode(ev: object) -> object:
    """An encoding that takes ENCODE_S of CPU, as the servicer's translation to protobuf does (faster)."""
    until = time.perf_counter() + ENCODE_S
    while time.perf_counter() < until:
        pass
    return ev


async def test_hub_time_counts_authentication_encoding_waits_and_the_end(model_info) -> None:
    s = session("dev-a", model_info)
    hub = service(s)
    agent = asyncio.create_task(fake_agent(s, WAIT_S, END_WAIT_S))
    n = 6
    begin = time.perf_counter()
    spec = GenerateSpec(
        prompt_from_value("the cat"), SamplingParams(max_tokens=n), Budget(), "tiny", arrived=begin - AUTH_S
    )
    events = [ev async for ev in hub.generate(spec, slow_encode)]
    wall_ms = (time.perf_counter() - begin) * 1000
    agent.cancel()
    assert [type(e) for e in events] == [Started] + [Chunk] * n + [Final]
    assert "".join(e.text for e in events if isinstance(e, Chunk)) == "".join(f"<{i}>" for i in range(n))
    m = events[-1].metrics
    # Routing counts from the arrival the servicer stamped (before authenticating) and takes in
    # Started's encoding; relaying counts each token's wait and encoding, and the WorkDone's wait.
    assert m.hub_route_ms >= (AUTH_S + ENCODE_S) * 1000
    assert m.hub_relay_ms >= (n * (WAIT_S + ENCODE_S) + END_WAIT_S) * 1000
    # Nothing counted twice: the windows do not overlap, so they fit in the request's wall time plus
    # the waits stamped before it.
    assert m.hub_route_ms + m.hub_relay_ms <= wall_ms + (AUTH_S + n * WAIT_S + END_WAIT_S) * 1000
    assert m.completion_tokens == n and m.ttft_ms >= AUTH_S * 1000


async def test_failover_in_process_goes_on_and_counts_both_routings(model_info) -> None:
    first, second = session("dev-a", model_info), session("dev-b", model_info)
    hub = service(first, second)
    agents = [asyncio.create_task(fake_agent(first, fail_at=3)), asyncio.create_task(fake_agent(second))]
    events = [
        ev
        async for ev in hub.generate(
            GenerateSpec(prompt_from_value("the cat"), SamplingParams(max_tokens=8), Budget(), "tiny")
        )
    ]
    for a in agents:
        a.cancel()
    # Like devices, both idle: the first serves, fails at its 4th token, and the second goes on.
    assert [e.token_ids for e in events if isinstance(e, Chunk)] == [(i,) for i in range(8)]
    starts = [e for e in events if isinstance(e, Started)]
    assert [[p.device_id for p in e.placements] for e in starts] == [["dev-a"], ["dev-a", "dev-b"]]
    assert events[-1].metrics.hub_route_ms > 0 and events[-1].metrics.completion_tokens == 8
    assert "tandem_failovers_total 1.0" in hub.metrics.exposition().decode()


def test_api_key_is_looked_up_once_and_a_bad_one_every_time(tmp_path: Path) -> None:
    hub = registry(tmp_path)
    key = hub.create_api_key("t")
    for _ in range(3):
        hub.check_api_key(key)
    assert hub.store.lookups == 1
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            hub.check_api_key(key[:-1] + ("x" if key[-1] != "x" else "y"))
    assert hub.store.lookups == 3


def test_candidates_follow_the_queue_and_a_reconnect(model_info) -> None:
    s = session("dev-a", model_info)
    hub = service(s)
    first = hub.placements.candidates("tiny", chat=False)
    assert [(c.device_id, c.queued) for c in first] == [("dev-a", 0)]
    assert hub.placements.candidates("tiny", chat=False)[0] is first[0]  # unchanged queue: the same candidate
    s.inflight = 3
    assert [c.queued for c in hub.placements.candidates("tiny", chat=False)] == [3]
    assert (
        hub.placements.candidates("other", chat=False) == []
        and bool(hub.placements.candidates("tiny", chat=True)) == model_info.chat
    )
    hub.fleet.attach(session("dev-a", None))  # reconnects serving nothing: the old offers must not stay
    assert hub.placements.candidates("tiny", chat=False) == []


def test_like_devices_share_a_prediction_but_keep_their_own_queues() -> None:
    from partitioner.cost import ModelCost

    cost, profile = ModelCost.from_config(SMOLLM2, bits_per_weight=32.0), load_profile("cpu-2core")
    queues = [2, 0, 1, 0, 3]
    cands = [Candidate("edge", f"d{i}", profile, "m", cost, q) for i, q in enumerate(queues)]
    router = BudgetRouter()
    for budget in (Budget(), Budget(ttft_ms=queued_estimate(predict(profile, cost, 50, 32), 1).ttft_ms)):
        choice = router.choose(cands, 50, 32, budget)
        # Brute force: each candidate on its own, then the first of the best.
        alone = [router.choose([c], 50, 32, Budget(best_effort=True)) for c in cands]
        assert [a.estimate for a in alone] == [queued_estimate(predict(profile, cost, 50, 32), q) for q in queues]
        best = min((a for a in alone if budget.ttft_ms == 0 or a.estimate.ttft_ms <= budget.ttft_ms),
                   key=lambda a: (a.estimate.edge_energy_j, a.estimate.total_ms))  # fmt: skip
        assert choice.candidate is best.candidate and choice.estimate == best.estimate
    assert router.choose(cands, 50, 32, Budget()).candidate.device_id == "d1"  # the first idle one
    busy = [c for c in cands if c.queued]
    assert router.choose(busy, 50, 32, Budget()).candidate.queued == 1


def test_sampling_is_validated_once_per_value_and_bad_values_every_time() -> None:
    def request(**sampling: object) -> pb.GenerateRequest:
        return pb.GenerateRequest(input=pb.Input(prompt="x"), sampling=pb.Sampling(**sampling))

    a, b = spec_from_request(request(max_tokens=5)), spec_from_request(request(max_tokens=5), arrived=2.0)
    assert a.params is b.params and b.arrived == 2.0
    assert spec_from_request(request(max_tokens=6, seed=1)).params == SamplingParams(max_tokens=6, seed=1)
    for _ in range(2):
        with pytest.raises(ModelInvalidRequest, match="temperature"):
            spec_from_request(request(temperature=500.0))


def test_metrics_series_are_looked_up_once_and_stay_right() -> None:
    m = HubMetrics()
    for _ in range(3):
        m.observe_request("edge", "ok", 20.0, 5.0)
    m.observe_request("edge", "ok", 20.0, 0.0)
    m.observe_request("none", "overloaded")
    text = m.exposition().decode()
    assert 'tandem_requests_total{outcome="ok",placement="edge"} 4.0' in text
    assert 'tandem_requests_total{outcome="overloaded",placement="none"} 1.0' in text
    assert 'tandem_ttft_seconds_count{placement="edge"} 4.0' in text
    assert 'tandem_tpot_seconds_count{placement="edge"} 3.0' in text
    assert 'tandem_ttft_seconds_count{placement="none"}' not in text  # latency series only for answers


async def test_work_queue_survives_a_cancelled_waiter() -> None:
    q = WorkQueue()
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    q.put((1.0, "a"))
    q.put((2.0, "b"))
    assert await q.get() == (1.0, "a") and await q.get() == (2.0, "b")
    late = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put((3.0, "c"))
    assert await asyncio.wait_for(late, 1) == (3.0, "c")
