"""Live state of the fleet: agents with an open work channel, their telemetry and status.

An `AgentSession` is one open WorkChannel stream. The hub puts `Work` into its outbox; the agent's
replies (tokens, done, error) are routed to the queue of the work they belong to. When the stream
ends, every unfinished work gets an `Unavailable` error, so a caller never waits on a dead device.

The hub sends an agent no more works at once than its Hello's `max_concurrency`: the rest wait here,
in the session's `held` queue (FIFO), and go down as the agent reports works finished. A caller that
goes away takes its work back: a held one is never sent, a sent one gets a `Cancel` and frees its slot
at once (the agent stops it within one decode step). Routing counts held works with the rest
(`inflight`), so the router's queue model sees them; the wait for a slot is the device's queueing,
added to the TTFT the agent reports (`Metrics.engine_ttft_ms`: "queueing included").
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cloud_hub.calibrations import Calibrations
from cloud_hub.errors import HubError, InvalidRequest, Unavailable
from cloud_hub.store import DeviceRecord
from tandem.v1 import tandem_pb2 as pb

if TYPE_CHECKING:
    from cloud_hub.candidates import Candidate

_CLOSED = object()  # sentinel in a work queue: the session ended
_REPLIES = frozenset(("tokens", "done", "error", "hidden"))
_CONTROL = frozenset(("hello", "update"))  # about the device, not a work: see AgentSession.on_control


class WorkQueue:
    """One work's replies, (arrival time, message), for the one request waiting on them.

    A deque and a single waiter: every token passes through here, and asyncio.Queue's bookkeeping
    (putters, unfinished-task counts, a join event) buys nothing for one producer and one consumer.
    """

    __slots__ = ("_items", "_waiter", "held_at", "waited_s")

    def __init__(self) -> None:
        self._items: collections.deque[tuple[float, object]] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self.held_at = 0.0
        """perf_counter() when its work was held at the hub for a slot (0: sent at once)."""
        self.waited_s = 0.0
        """How long its work waited at the hub for a slot on the device."""

    def put(self, item: tuple[float, object]) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():  # done: its waiter was cancelled
            waiter.set_result(None)

    async def get(self) -> tuple[float, object]:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


@dataclass
class Telemetry:
    """Latest telemetry of one device (from MQTT)."""

    load: float = 0.0
    memory_mb: float = 0.0
    power_w: float = 0.0
    temperature_c: float | None = None
    queue_depth: int = 0
    power_sensor: str = ""
    """The sensor its power_w was read from ("": estimated from its profile)."""
    at: float = 0.0


@dataclass
class AgentSession:
    record: DeviceRecord
    models: tuple[pb.ModelInfo, ...]
    max_concurrency: int = 1
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    works: dict[str, WorkQueue] = field(default_factory=dict)
    closed: bool = False
    inflight: int = 0
    """Requests routed here and not finished: counted from the routing decision on, so that
    concurrent requests see each other before their work reaches the device (held ones included)."""
    running: set[str] = field(default_factory=set)
    """Ids of works sent down and not finished: at most max_concurrency."""
    held: collections.deque[pb.Work] = field(default_factory=collections.deque)
    """Works waiting at the hub for a slot, oldest first; one whose caller went away is skipped."""
    rtt_ms: float | None = None
    """Moving average of the work channel's round trip, from the hub's pings and the agent's pongs."""
    uplink_mbps: float | None = None
    """Moving average of the agent's uplink as split stages' prompt transfers measured it (None: none yet)."""
    offers: list[tuple[str, bool, Candidate]] | None = field(default=None, repr=False)
    """(model name, chat, routing candidate) per model served, built by the hub on first use and
    kept with the session: a reconnect (a new session) starts afresh."""
    on_control: Callable[[AgentSession, pb.AgentMessage], None] | None = field(default=None, repr=False)
    """Takes the agent's messages about the device rather than a work: a Hello after the first (it
    swapped its models: cloud_hub.updates replaces `models` and clears `offers`) and an UpdateResult.
    None: such a message is malformed."""

    def __post_init__(self) -> None:
        self.max_concurrency = max(1, self.max_concurrency)  # 0 (an unset Hello field) means one at a time

    @property
    def device_id(self) -> str:
        return self.record.device_id

    @property
    def waiting(self) -> int:
        """Works held at the hub for a slot whose callers still wait."""
        return sum(w.work_id in self.works for w in self.held)

    def run(self, work: pb.Work) -> AsyncIterator[tuple[float, pb.TokenChunk | pb.WorkDone]]:
        """Send `work` down now, or hold it until the agent has a free slot; the iterator returned
        yields (arrival time, message): the agent's TokenChunks (a split stage's HiddenStates), then
        its WorkDone. Iterate it at once:
        closing it early cancels the work (a held one is never sent).

        Raises Unavailable if the session has ended; the iterator raises Unavailable if it ends
        first, or the HubError the agent reported.
        """
        if self.closed:
            raise Unavailable(f"device {self.device_id} disconnected")
        queue = WorkQueue()
        self.works[work.work_id] = queue
        if len(self.running) < self.max_concurrency:
            self._send(work)
        else:
            queue.held_at = time.perf_counter()
            self.held.append(work)
        return self._replies(work.work_id, queue)

    def _send(self, work: pb.Work) -> None:
        self.running.add(work.work_id)
        self.outbox.put_nowait(pb.HubMessage(work=work))

    def _free(self, work_id: str) -> None:
        """The agent no longer runs `work_id`: its slot goes to the oldest held work still wanted."""
        self.running.discard(work_id)
        while self.held and len(self.running) < self.max_concurrency:
            work = self.held.popleft()
            queue = self.works.get(work.work_id)
            if queue is not None:  # None: its caller went away while it waited
                queue.waited_s = time.perf_counter() - queue.held_at
                self._send(work)

    async def _replies(
        self, work_id: str, queue: WorkQueue
    ) -> AsyncIterator[tuple[float, pb.TokenChunk | pb.WorkDone]]:
        finished = False
        try:
            while True:
                received, item = await queue.get()
                if item is _CLOSED:
                    raise Unavailable(f"device {self.device_id} disconnected during the request")
                if type(item) is pb.WorkError:
                    finished = True
                    raise _agent_error(item)
                finished = type(item) is pb.WorkDone
                if finished and queue.waited_s:  # its wait for a slot was the device's queue
                    item.metrics.ttft_ms += queue.waited_s * 1000
                    item.metrics.queue_ms += queue.waited_s * 1000
                yield received, item
                if finished:
                    return
        finally:
            self.works.pop(work_id, None)
            if work_id in self.running and not self.closed:  # sent, unfinished, and nobody waits for it
                self.outbox.put_nowait(pb.HubMessage(cancel=pb.Cancel(work_id=work_id)))
                self._free(work_id)
            elif len(self.held) > 2 * len(self.works) + 8:  # mostly works nobody waits for: drop them now
                self.held = collections.deque(w for w in self.held if w.work_id in self.works)

    def deliver(self, msg: pb.AgentMessage, received: float) -> None:
        """Route one agent message, which arrived at `received` (perf_counter), to its work; pongs
        are dropped. Raises InvalidRequest for a malformed message."""
        kind = msg.WhichOneof("kind")
        if kind not in _REPLIES:
            if kind in _CONTROL and self.on_control is not None:
                self.on_control(self, msg)
                return
            if kind == "pong":  # the hub's own clock both ways: no skew
                rtt = (time.time() - msg.pong.sent_unix) * 1000
                if 0 <= rtt < 60_000:
                    self.rtt_ms = rtt if self.rtt_ms is None else 0.7 * self.rtt_ms + 0.3 * rtt
                return
            raise InvalidRequest(f"unexpected work-channel message {kind!r}")
        item = getattr(msg, kind)
        queue = self.works.get(item.work_id)
        if queue is not None:  # replies to cancelled work are dropped
            queue.put((received, item))
        if kind in ("done", "error") and item.work_id in self.running:  # the agent is done with it: a slot is free
            self._free(item.work_id)

    def send_input(self, stage: pb.StageInput) -> None:
        """The next input of a split stage this session runs (cloud_hub.split); its reply comes as the
        work's next item."""
        if self.closed:
            raise Unavailable(f"device {self.device_id} disconnected")
        self.outbox.put_nowait(pb.HubMessage(stage=stage))

    def close(self) -> None:
        """End the session: pending works (held ones too) fail with Unavailable, the stream's writer stops."""
        if not self.closed:
            self.outbox.put_nowait(None)  # wakes the servicer's writer loop, which then ends the stream
        self.closed = True
        self.held.clear()
        self.running.clear()
        for queue in self.works.values():
            queue.put((0.0, _CLOSED))


def _agent_error(err: pb.WorkError) -> HubError:
    from cloud_hub import errors

    by_code: dict[str, type[HubError]] = {}
    for cls in vars(errors).values():  # the first class of each code: RESOURCE_EXHAUSTED is Overloaded
        if isinstance(cls, type) and issubclass(cls, HubError):
            by_code.setdefault(cls.code.name, cls)
    cls = by_code.get(err.code, Unavailable)
    if cls is errors.BudgetUnsatisfiable:
        return errors.BudgetUnsatisfiable(err.message, "unknown")
    return cls(f"device error: {err.message}")


@dataclass
class Fleet:
    """Sessions by device id, with telemetry and MQTT status."""

    sessions: dict[str, AgentSession] = field(default_factory=dict)
    telemetry: dict[str, Telemetry] = field(default_factory=dict)
    mqtt_status: dict[str, str] = field(default_factory=dict)
    calibrations: Calibrations = field(default_factory=Calibrations)
    """What the hub knows of each device's speed (the Hub gives it the registry to keep it in)."""

    def attach(self, session: AgentSession) -> None:
        old = self.sessions.get(session.device_id)
        if old is not None:  # a reconnect replaces a stale stream
            old.close()
        self.sessions[session.device_id] = session
        self.calibrations.attach(session.device_id, session.models)

    def detach(self, session: AgentSession) -> None:
        session.close()
        if self.sessions.get(session.device_id) is session:
            del self.sessions[session.device_id]
        self.calibrations.save_device(session.device_id)

    def online(self) -> list[AgentSession]:
        """Connected sessions not marked offline over MQTT (a last will can beat the TCP reset)."""
        return [s for s in self.sessions.values() if not s.closed and self.mqtt_status.get(s.device_id) != "offline"]

    def status_of(self, device_id: str) -> str:
        session = self.sessions.get(device_id)
        if session is None or session.closed or self.mqtt_status.get(device_id) == "offline":
            return "offline"
        return "online"

    def update_telemetry(self, device_id: str, data: dict) -> None:
        t = self.telemetry.setdefault(device_id, Telemetry())
        for key in ("load", "memory_mb", "power_w", "temperature_c", "queue_depth"):
            if key in data and (data[key] is None or isinstance(data[key], (int, float))):
                setattr(t, key, data[key])
        sensor = data.get("power_sensor", "")
        t.power_sensor = sensor[:64] if isinstance(sensor, str) else ""
        t.at = time.time()
