"""The edge agent: enroll once, dial out to the hub, serve work, publish telemetry.

Devices sit behind NAT, so the agent opens the connection: a bidirectional WorkChannel stream on
which the hub sends work and the agent streams tokens back. Any disconnect (hub restart, network
loss) is followed by a reconnect with jittered exponential backoff; only a rejected credential
stops the agent, since retrying cannot fix it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from edge_agent.spool import Spool
from edge_agent.telemetry import MqttSettings, TelemetryPublisher
from models.errors import InvalidRequest
from models.generate import Continuation
from models.sampling import SamplingParams
from models.serving import ServedModel
from models.streaming import iterate_in_thread
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tandem.wire import prompt_of, sampling_kwargs

log = logging.getLogger("tandem.agent")
VERSION = "0.1.0"
COALESCE_MAX = 64  # queued messages the writer merges at once


def coalesce(messages: list[pb.AgentMessage]) -> list[pb.AgentMessage]:
    """The same replies in fewer messages: each work's queued TokenChunks become one (its ids
    and text concatenated, at the place of its first), so a busy agent sends what it has ready
    together and the hub relays one message where it would relay several. Nothing waits for
    this: it merges only what is already queued. Order within a work is kept (its WorkDone or
    WorkError follows all of its tokens); across works it does not matter.
    """
    out: list[pb.AgentMessage] = []
    open_chunks: dict[str, pb.TokenChunk] = {}
    for msg in messages:
        kind = msg.WhichOneof("kind")
        if kind != "tokens":
            if kind in ("done", "error"):
                open_chunks.pop(getattr(msg, kind).work_id, None)
            out.append(msg)
            continue
        chunk = open_chunks.get(msg.tokens.work_id)
        if chunk is None:
            open_chunks[msg.tokens.work_id] = msg.tokens
            out.append(msg)
        else:
            chunk.token_ids.extend(msg.tokens.token_ids)
            chunk.text += msg.tokens.text
    return out


@dataclass(frozen=True)
class AgentConfig:
    hub: str
    """host:port of the hub's gRPC endpoint."""
    profile: str
    """Device profile name."""
    state_dir: Path
    """Where the credential file lives (created 0700, the file 0600)."""
    name: str = "edge-device"
    """Human-readable device name."""
    token: str | None = None
    """One-time enrollment token; needed only until the credential is saved."""
    emulated: bool = False
    """The engine is paced to the profile (this machine is not that device)."""
    power_active_w: float = 10.0
    """Power while generating, for the energy estimate (from the profile)."""
    backoff_max_s: float = 10.0
    """Longest wait between reconnect attempts."""
    telemetry_interval_s: float = 1.0
    """Seconds between telemetry samples."""
    tls_ca: Path | None = None
    """The deployment's CA certificate: dial the hub over TLS (None: plaintext)."""
    spool_max_records: int = 10_000
    """Telemetry kept on disk while the broker is unreachable (oldest dropped beyond it)."""


@dataclass(frozen=True)
class Credentials:
    device_id: str
    credential: str
    hub: str
    mqtt: MqttSettings | None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-tandem-device-id", self.device_id), ("x-tandem-credential", self.credential))


class EnrollmentRejected(RuntimeError):
    """The hub refused the token or the saved credential: retrying will not help."""


def credentials_path(state_dir: Path) -> Path:
    return state_dir / "credentials.json"


def save_credentials(state_dir: Path, creds: Credentials) -> None:
    """Write the credential file readable by the owner only (0600), atomically."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = state_dir / ".credentials.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({**asdict(creds), "mqtt": asdict(creds.mqtt) if creds.mqtt else None}, f)
    os.replace(tmp, credentials_path(state_dir))


def load_credentials(state_dir: Path) -> Credentials | None:
    path = credentials_path(state_dir)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    mqtt = MqttSettings(**data["mqtt"]) if data.get("mqtt") else None
    return Credentials(data["device_id"], data["credential"], data["hub"], mqtt)


class Agent:
    def __init__(self, config: AgentConfig, engine: ServedModel) -> None:
        self.config, self.engine = config, engine
        self.creds: Credentials | None = None
        self.telemetry: TelemetryPublisher | None = None
        self.connected = asyncio.Event()
        self.pending = 0  # works received and not finished: the queue depth
        self._cancels: dict[str, threading.Event] = {}

    async def enroll(self, channel: grpc.aio.Channel) -> Credentials:
        """Saved credentials, or enroll with the token and save them."""
        saved = load_credentials(self.config.state_dir)
        if saved is not None and saved.hub == self.config.hub:
            return saved
        if not self.config.token:
            raise EnrollmentRejected("no saved credential for this hub and no enrollment token given (--token)")
        req = pb.EnrollRequest(
            token=self.config.token,
            name=self.config.name,
            profile=self.config.profile,
            models=[pb.ModelInfo(**self.engine.info)],
            emulated=self.config.emulated,
        )
        try:
            resp = await pb_grpc.RegistryStub(channel).Enroll(req, timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                raise EnrollmentRejected(f"enrollment refused: {exc.details()}") from exc
            raise
        m = resp.mqtt
        mqtt = MqttSettings(m.host, m.port, m.username, m.password, m.topic_prefix) if m.host else None
        creds = Credentials(resp.device_id, resp.credential, self.config.hub, mqtt)
        save_credentials(self.config.state_dir, creds)
        log.info("enrolled as %s", creds.device_id)
        return creds

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, reconnecting after any disconnect."""
        attempt = 0
        if self.config.tls_ca is not None:
            creds = grpc.ssl_channel_credentials(self.config.tls_ca.read_bytes())
            channel_cm = grpc.aio.secure_channel(self.config.hub, creds)
        else:
            channel_cm = grpc.aio.insecure_channel(self.config.hub)
        async with channel_cm as channel:
            while not stop.is_set():
                try:
                    if self.creds is None:
                        self.creds = await self.enroll(channel)
                        self._start_telemetry()
                    await self._serve(channel, stop)
                    attempt = 0
                except EnrollmentRejected:
                    raise
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                        raise EnrollmentRejected(f"the hub rejected this device's credential: {exc.details()}") from exc
                    log.warning("work channel lost (%s); reconnecting", exc.code().name)
                finally:
                    self.connected.clear()
                attempt += 1
                delay = min(self.config.backoff_max_s, 0.25 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        if self.telemetry is not None:
            self.telemetry.stop()

    def _start_telemetry(self) -> None:
        if self.creds is None or self.creds.mqtt is None or self.telemetry is not None:
            return

        def sample() -> dict:
            busy = self.pending > 0
            return {
                "load": min(1.0, self.pending),
                "queue_depth": max(0, self.pending - 1),
                "power_w": self.config.power_active_w if busy else 0.0,
            }

        spool = Spool(self.config.state_dir / "telemetry-spool.db", self.config.spool_max_records)
        self.telemetry = TelemetryPublisher(self.creds.mqtt, sample, self.config.telemetry_interval_s, spool=spool)
        self.telemetry.start()

    async def _serve(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        assert self.creds is not None
        outbox: asyncio.Queue = asyncio.Queue()
        outbox.put_nowait(
            pb.AgentMessage(
                hello=pb.Hello(models=[pb.ModelInfo(**self.engine.info)], max_concurrency=1, agent_version=VERSION)
            )
        )

        async def outgoing():
            while True:
                batch = [await outbox.get()]
                while len(batch) < COALESCE_MAX and not outbox.empty():
                    batch.append(outbox.get_nowait())
                for msg in coalesce(batch):
                    yield msg

        call = pb_grpc.WorkChannelStub(channel).Connect(outgoing(), metadata=self.creds.metadata())
        self.connected.set()
        tasks: set[asyncio.Task] = set()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            reader = call.__aiter__()
            while True:
                nxt = asyncio.ensure_future(reader.__anext__())
                done, _ = await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    nxt.cancel()
                    call.cancel()
                    return
                try:
                    msg = nxt.result()
                except StopAsyncIteration:
                    return
                self._dispatch(msg, outbox, tasks)
        finally:
            stopper.cancel()
            for ev in self._cancels.values():
                ev.set()
            for t in tasks:
                t.cancel()

    def _dispatch(self, msg: pb.HubMessage, outbox: asyncio.Queue, tasks: set[asyncio.Task]) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "work":
            task = asyncio.create_task(self._work(msg.work, outbox))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif kind == "cancel" and msg.cancel.work_id in self._cancels:
            self._cancels[msg.cancel.work_id].set()
        elif kind == "ping":
            outbox.put_nowait(pb.AgentMessage(pong=pb.Pong(sent_unix=msg.ping.sent_unix)))

    async def _work(self, work: pb.Work, outbox: asyncio.Queue) -> None:
        cancel = threading.Event()
        self._cancels[work.work_id] = cancel
        self.pending += 1
        try:
            start = time.perf_counter()  # tokenizing the prompt is engine work: counted from here
            params, ids = self._prepare(work)
            cont = Continuation(tuple(work.continue_ids), work.continue_chars) if work.continue_ids else None
            first = last = None
            count, finish = 0, "length"
            async for ev in iterate_in_thread(lambda: self.engine.stream(ids, params, cancel, cont), cancel):
                now = time.perf_counter()
                first = first or now
                last = now
                count += 1
                finish = ev.finish_reason or finish
                outbox.put_nowait(
                    pb.AgentMessage(tokens=pb.TokenChunk(work_id=work.work_id, token_ids=[ev.token_id], text=ev.text))
                )
            busy_s = (last or start) - start
            metrics = pb.Metrics(
                prompt_tokens=len(ids),
                completion_tokens=count,
                ttft_ms=((first or start) - start) * 1000,
                tpot_ms=((last - first) * 1000 / (count - 1)) if first and last and count > 1 else 0.0,
                energy_j=self.config.power_active_w * busy_s,
            )
            outbox.put_nowait(
                pb.AgentMessage(done=pb.WorkDone(work_id=work.work_id, finish_reason=finish, metrics=metrics))
            )
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

    def _prepare(self, work: pb.Work) -> tuple[SamplingParams, list[int]]:
        params = SamplingParams(**sampling_kwargs(work.sampling))
        prompt = prompt_of(work.input)
        if prompt is None:
            raise InvalidRequest("work has no input")
        return params, self.engine.encode(prompt)
