"""An agent runs no more requests at once than it advertises, and cancelled work stops at once.

- A counting model (no lock: it runs whatever it is handed) advertises 2 slots; through the hub it
  never runs more than 2, whether the hub holds the rest (as it does) or sends everything at once.
- A cancelled request stops within one decode step and frees its engine state (its KV cache); one
  cancelled while it waits never computes anything.
- 200 streams against one agent, all cancelled: a normal request then completes within 3 s, and the
  agent's process spends little CPU meanwhile (read from /proc: the agent is a real child process).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch

from cloud_hub.server import Hub
from edge_agent.engines.torch_engine import TorchEngine
from models.generate import Continuation, TokenEvent
from models.loaded import LoadedModel
from models.runtime import load
from models.sampling import SamplingParams
from models.serving import Pace, ServedModel
from tandem import AsyncClient
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tests.hubkit import RunningAgent, kill, running_hub, spawn_agent, start_served_agent, tiny_llama, wait_for
from tests.tiny import TinySpec, write_tiny_gguf

TOKEN_S = 0.02


class CountingModel(ServedModel):
    """Streams made-up tokens TOKEN_S apart, with no lock: it runs as many requests at once as it is
    handed, and counts them."""

    max_concurrency = 2

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__("tiny", loaded, warmup=False)
        self.running = self.most = self.started = 0
        self._count = threading.Lock()

    def stream(
        self, ids: list[int], params: SamplingParams, cancel: threading.Event, continuation: Continuation | None = None
    ) -> Iterator[TokenEvent]:
        with self._count:
            self.running, self.started = self.running + 1, self.started + 1
            self.most = max(self.most, self.running)
        try:
            for i in range(params.max_tokens):
                if cancel.wait(TOKEN_S):
                    return
                yield TokenEvent(0, 5, "x", "length" if i == params.max_tokens - 1 else None)
        finally:
            with self._count:
                self.running -= 1


class CountingEngine:
    """A StepEngine around the torch engine that counts its steps and the requests it holds state for;
    each decode step takes at least `step_s` (a slower device)."""

    def __init__(self, inner: TorchEngine, step_s: float = 0.0) -> None:
        self.inner, self.step_s, self.prefills, self.decodes, self.live = inner, step_s, 0, 0, set[str]()

    def prefill(self, request_id: str, ids: Sequence[int], max_len: int) -> torch.Tensor:
        self.prefills += 1
        self.live.add(request_id)
        return self.inner.prefill(request_id, ids, max_len)

    def decode(self, request_id: str, token: int) -> torch.Tensor:
        self.decodes += 1
        time.sleep(self.step_s)
        return self.inner.decode(request_id, token)

    def release(self, request_id: str) -> None:
        self.live.discard(request_id)
        self.inner.release(request_id)


def engine_model(path: Path, step_s: float = 0.0) -> tuple[ServedModel, CountingEngine]:
    torch_engine = TorchEngine("cpu")
    torch_engine.load(str(path))
    engine = CountingEngine(torch_engine, step_s)
    return ServedModel("tiny", torch_engine.loaded, engine, warmup=False), engine


async def start(hub: Hub, served: ServedModel, state_dir: Path) -> RunningAgent:
    return await start_served_agent(hub, served, state_dir, "counted")


async def test_an_agent_never_runs_more_requests_than_it_advertises(tmp_path: Path) -> None:
    model = CountingModel(load(tiny_llama(tmp_path), use_cache=False))
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        key = hub.registry.create_api_key("t")
        ra = await start(hub, model, tmp_path / "agent")
        session = hub.fleet.online()[0]
        assert session.max_concurrency == 2  # the Hello said so
        seen: list[tuple[int, int]] = []  # (works sent down, works held at the hub), sampled

        async def watch() -> None:
            while True:
                seen.append((len(session.running), session.waiting))
                await asyncio.sleep(0.002)

        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:

            async def burst() -> list[int]:
                results = await asyncio.gather(*(client.generate("the cat", max_tokens=5) for _ in range(8)))
                return [r.completion_tokens for r in results]

            watcher = asyncio.create_task(watch())
            assert await burst() == [5] * 8
            assert model.most == 2 and model.started == 8
            assert max(sent for sent, _ in seen) == 2 and max(held for _, held in seen) >= 4  # the hub held them
            # A hub that sends all it has at once (one that ignores the Hello): the agent holds the rest.
            session.max_concurrency = 100
            seen.clear()
            model.most = 0
            assert await burst() == [5] * 8
            watcher.cancel()
            assert max(sent for sent, _ in seen) > 2 and model.most == 2
        assert ra.agent.pending == 0
        await ra.close()


def test_a_cancelled_request_stops_within_one_decode_step_and_frees_its_cache(tmp_path: Path) -> None:
    served, engine = engine_model(tiny_llama(tmp_path))
    params, ids = SamplingParams(max_tokens=50, ignore_eos=True), [5, 6, 7, 8]
    cancel = threading.Event()
    events = served.stream(ids, params, cancel)
    for _ in range(3):
        next(events)
    decodes = engine.decodes
    cancel.set()
    assert list(events) == []
    assert engine.decodes - decodes <= 1 and engine.live == set()  # one step at most, then released
    # Cancelled while it waited for the model: nothing computed.
    assert list(served.stream(ids, params, cancel)) == [] and engine.prefills == 1
    # Cancelled while the pacer holds a token back (5 s a token): it returns at once, released.
    served.pacer = lambda prompt, new, kv_layers: Pace(0.0, 5000.0)
    cancel = threading.Event()
    events = served.stream(ids, params, cancel)
    next(events)
    threading.Timer(0.1, cancel.set).start()
    begin = time.perf_counter()
    assert list(events) == [] and time.perf_counter() - begin < 2.0
    assert engine.live == set()
    # The model is free again: the next request runs in full.
    served.pacer = None
    assert len(list(served.stream(ids, SamplingParams(max_tokens=4, ignore_eos=True), threading.Event()))) == 4


async def test_work_cancelled_while_waiting_on_the_agent_never_computes(tmp_path: Path) -> None:
    # Decode steps of 200 ms: the cancels, sent together, all reach the agent while the running work
    # finishes its step; the works waiting behind it must then be gone, not started in turn.
    served, engine = engine_model(tiny_llama(tmp_path), step_s=0.2)
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        key = hub.registry.create_api_key("t")
        ra = await start(hub, served, tmp_path / "agent")
        hub.fleet.online()[0].max_concurrency = 100  # a hub that sends everything: the agent must hold it
        async with grpc.aio.insecure_channel(hub.address) as channel:
            stub, md = pb_grpc.InferenceStub(channel), (("authorization", f"Bearer {key}"),)
            request = pb.GenerateRequest(input=pb.Input(prompt="the cat"), sampling=pb.Sampling(max_tokens=100))
            calls = [stub.Generate(request, metadata=md) for _ in range(5)]
            await wait_for(lambda: ra.agent.pending == 5 and engine.decodes > 0, timeout=10)
            begin = time.monotonic()
            for call in calls:
                call.cancel()
            took = await wait_for(lambda: ra.agent.pending == 0, timeout=5)
        assert took < 1.0, "stopped within a step (200 ms), not after the request's 20 s"
        assert engine.prefills == 1 and engine.live == set()  # the 4 that waited never started; all freed
        assert time.monotonic() - begin < 2.0
        await ra.close()


# -- 200 streams, cancelled ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


LONG_PROMPT = "the cat sat in a hat and " * 24  # about 500 tokens: each prefill costs the agent real CPU


async def _storm(hub: Hub, key: str, model: str, pid: int, streams: int) -> tuple[float, float]:
    """Open `streams` streams, cancel them all, then time a normal request from the cancel on; returns
    (seconds to the normal request's answer, agent CPU seconds from the cancel to 1 s after it)."""
    async with grpc.aio.insecure_channel(hub.address) as channel, AsyncClient(hub.address, api_key=key) as client:
        stub, md = pb_grpc.InferenceStub(channel), (("authorization", f"Bearer {key}"),)
        request = pb.GenerateRequest(
            model=model, input=pb.Input(prompt=LONG_PROMPT), sampling=pb.Sampling(max_tokens=200)
        )
        calls = [stub.Generate(request, metadata=md) for _ in range(streams)]
        for call in calls:
            await call.read()  # Started: admitted and routed to the agent
        session = hub.fleet.online()[0]
        await wait_for(lambda: len(session.works) == streams and session.outbox.empty(), timeout=30)
        await asyncio.sleep(0.5)  # what the hub sent is on the agent now
        cpu, begin = cpu_seconds(pid), time.monotonic()
        for call in calls:
            call.cancel()
        result = await client.generate("the cat", model=model, max_tokens=8, timeout=60)
        took = time.monotonic() - begin
        assert result.completion_tokens == 8
        await wait_for(lambda: hub.service.inflight == 0, timeout=10)
        await asyncio.sleep(1.0)  # work the agent would still be doing for the cancelled streams
        return took, cpu_seconds(pid) - cpu


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the agent's CPU time from /proc")
async def test_200_cancelled_streams_leave_the_agent_free_at_once(tmp_path: Path) -> None:
    spec = TinySpec(arch="llama", n_layers=4, dim=256, ffn_dim=768, n_heads=8, n_kv_heads=4, head_dim=32,
                    context_length=1024)  # fmt: skip
    model = str(write_tiny_gguf(tmp_path / "mid.gguf", spec))
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        key = hub.registry.create_api_key("t")
        proc = spawn_agent(hub, model, tmp_path / "agent", "busy", extra=("--pace-tpot-ms", "20"))
        try:
            await wait_for(lambda: bool(hub.fleet.online()), timeout=90)
            async with AsyncClient(hub.address, api_key=key, timeout=60) as client:
                cpu = cpu_seconds(proc.pid)
                for _ in range(3):  # one prefill of the long prompt, the cost each cancelled stream once had
                    await client.generate(LONG_PROMPT, model=model, max_tokens=1)
                prefill_cpu = (cpu_seconds(proc.pid) - cpu) / 3
            # The hub holds all but one stream (the agent runs one at a time), then sends everything.
            for over_send in (False, True):
                if over_send:
                    hub.fleet.online()[0].max_concurrency = 1000
                took, cpu = await _storm(hub, key, model, proc.pid, 200)
                where = "the agent" if over_send else "the hub"
                assert took < 3.0, f"held at {where}: a normal request took {took:.1f} s after the cancel"
                # Before, every cancelled stream was prefilled in turn: 200 prefills of CPU.
                assert cpu < 1.0 + 5 * prefill_cpu < 200 * prefill_cpu, (where, cpu, prefill_cpu)
        finally:
            kill(proc)
            proc.stdout.close()  # type: ignore[union-attr]
