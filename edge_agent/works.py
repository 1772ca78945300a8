"""Running the works a hub sends: the agent's concurrency slots, cancels, generation and split stages.

`WorkRunner` is a mixin of edge_agent.agent.Agent, kept apart because it is the one part of the
agent that computes: a work waits for one of `max_concurrency` slots, then streams its tokens (or
serves one split stage, edge_agent.stage) into the open work channel's outbox and ends with a
WorkDone carrying its metrics, or a WorkError (an engine failure ends that work, never the agent).
The agent owns the state declared below and the work channel that feeds `_work` and `_cancel`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from edge_agent.messages import skip_metrics, token_chunk
from edge_agent.power import SensorError
from edge_agent.power_meter import EnergyMeter
from edge_agent.stage import serve_stage
from models.errors import InvalidRequest
from models.generate import Continuation
from models.kvpred import KVReport
from models.sampling import SamplingParams
from models.serving import ServedModel
from models.skip import SkipReport
from models.streaming import iterate_in_thread
from models.threads import fitted
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import prompt_of, sampling_kwargs, set_kv_report, tools_of

if TYPE_CHECKING:
    from edge_agent.agent import AgentConfig

log = logging.getLogger("tandem.agent")


class WorkRunner:
    """The agent's works, from a slot to their last reply (mixed into edge_agent.agent.Agent)."""

    # Set by Agent.__init__ (what each one holds is said there).
    config: AgentConfig
    engine: ServedModel
    pending: int
    _cancels: dict[str, threading.Event]
    _stage_inputs: dict[str, queue.Queue]
    _slots: asyncio.Semaphore
    _waiting: dict[str, asyncio.Task]

    def _cancel(self, work_id: str) -> None:
        """Stop a work at once: one waiting for a slot is dropped before it computes anything; a running
        one stops within one decode step and frees its state (models.serving.ServedModel.stream)."""
        waiting = self._waiting.pop(work_id, None)
        if waiting is not None:
            waiting.cancel()
        cancel = self._cancels.get(work_id)
        if cancel is not None:
            cancel.set()
        inputs = self._stage_inputs.get(work_id)
        if inputs is not None:
            inputs.put(None)  # wakes a stage waiting for its next input

    async def _work(self, work: pb.Work, outbox: asyncio.Queue) -> None:
        """Run one work when a slot is free, and report it. At most max_concurrency works run at once;
        the others wait here for a slot, holding no thread (a Cancel drops a waiting one: _cancel)."""
        received = time.perf_counter()  # its TTFT counts from here: waiting for a slot is queueing
        cancel = threading.Event()
        self._cancels[work.work_id] = cancel
        self.pending += 1
        try:
            async with self._slots:
                self._waiting.pop(work.work_id, None)  # running now: a Cancel stops it between steps
                if not cancel.is_set():  # set while it waited: the session ended
                    if work.layer_end:  # one stage of a split request
                        done = await self._stage(work, cancel, outbox)
                        if done is not None:
                            outbox.put_nowait(done)
                    else:
                        outbox.put_nowait(await self._compute(work, cancel, outbox, received))
        except InvalidRequest as exc:
            err = pb.WorkError(work_id=work.work_id, code="INVALID_ARGUMENT", message=str(exc))
            outbox.put_nowait(pb.AgentMessage(error=err))
        except Exception as exc:  # an engine failure ends this work, never the agent
            log.exception("work %s failed", work.work_id)
            err = pb.WorkError(work_id=work.work_id, code="INTERNAL", message=f"{type(exc).__name__}: {exc}")
            outbox.put_nowait(pb.AgentMessage(error=err))
        finally:
            self.pending -= 1
            self._cancels.pop(work.work_id, None)

    async def _stage(self, work: pb.Work, cancel: threading.Event, outbox: asyncio.Queue) -> pb.AgentMessage | None:
        """Serve one split stage (edge_agent.stage) in a thread; its StageInputs arrive by _dispatch."""
        inputs: queue.Queue = queue.Queue()
        self._stage_inputs[work.work_id] = inputs
        loop = asyncio.get_running_loop()

        def send(msg: pb.AgentMessage) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, msg)

        engine = self.engine  # the model this stage started on, whatever an update swaps in meanwhile
        try:
            return await asyncio.to_thread(serve_stage, engine, work, inputs, cancel, send, self.config.power_active_w)
        finally:
            self._stage_inputs.pop(work.work_id, None)

    async def _compute(
        self, work: pb.Work, cancel: threading.Event, outbox: asyncio.Queue, received: float
    ) -> pb.AgentMessage:
        """Stream `work`'s tokens into `outbox`; returns its WorkDone (TTFT from `received`, the energy
        of the time computing)."""
        start = time.perf_counter()  # tokenizing the prompt is engine work: counted from here
        engine = self.engine  # the model this request runs on to its end, whatever an update swaps in meanwhile
        params, ids = self._prepare(work, engine)
        cont = Continuation(tuple(work.continue_ids), work.continue_chars) if work.continue_ids else None
        first = last = None
        count, finish = 0, "length"
        skipping: SkipReport | None = None  # on the last event, with Sampling.skip_ratio
        kv: KVReport | None = None  # on the last event, with Sampling.kv_prediction
        sensor = self.config.power_sensor
        meter = _started(EnergyMeter(sensor)) if sensor is not None else None
        try:
            async for ev in iterate_in_thread(fitted(lambda: engine.stream(ids, params, cancel, cont)), cancel):
                now = time.perf_counter()
                first = first or now
                last = now
                count += 1
                finish = ev.finish_reason or finish
                skipping = ev.skipping or skipping
                kv = ev.kv or kv
                outbox.put_nowait(pb.AgentMessage(tokens=token_chunk(work.work_id, ev, ids)))
        finally:  # a cancelled or failed request stops its meter too
            energy = _stopped(meter)
        tpot = ((last - first) * 1000 / (count - 1)) if first and last and count > 1 else 0.0
        metrics = pb.Metrics(
            prompt_tokens=len(ids),
            completion_tokens=count,
            ttft_ms=((first or received) - received) * 1000,
            tpot_ms=tpot,
            energy_j=energy if energy is not None else self.config.power_active_w * ((last or start) - start),
            energy_measured=energy is not None,
            prefill_ms=((first or start) - start) * 1000,  # tokenizing through the first token: the engine alone
            decode_ms=tpot,
            queue_ms=(start - received) * 1000,  # waiting here for a slot
        )
        if skipping is not None:
            skip_metrics(metrics, skipping)
        if kv is not None:
            set_kv_report(metrics, **vars(kv))
        return pb.AgentMessage(done=pb.WorkDone(work_id=work.work_id, finish_reason=finish, metrics=metrics))

    def _prepare(self, work: pb.Work, engine: ServedModel) -> tuple[SamplingParams, list[int]]:
        params = SamplingParams(**sampling_kwargs(work.sampling))
        prompt = prompt_of(work.input)
        if prompt is None:
            raise InvalidRequest("work has no input")
        return params, engine.encode(prompt, tools_of(work.input))


def _started(meter: EnergyMeter) -> EnergyMeter | None:
    """The meter, started; None (the estimate stands in) if its sensor cannot be read now."""
    try:
        meter.start()
    except SensorError as exc:
        log.warning("power sensor unreadable, energy estimated: %s", exc)
        return None
    return meter


def _stopped(meter: EnergyMeter | None) -> float | None:
    """Joules the meter measured, or None when there was none or its sensor failed meanwhile."""
    if meter is None:
        return None
    try:
        return meter.stop().joules
    except SensorError as exc:
        log.warning("power sensor failed during a request, energy estimated: %s", exc)
        return None
