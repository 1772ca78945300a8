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
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc

from edge_agent.identity import (
    DeviceIdentity,
    device_address,
    hub_host,
    load_identity,
    new_key_request,
    save_identity,
)
from edge_agent.ota import (
    ServedLoader,
    UpdateCommand,
    UpdateFailed,
    bundle_served,
    fetch_bundle,
    load_update,
    save_served,
)
from edge_agent.power import EnergyMeter, PowerGauge, PowerSensor, SensorError
from edge_agent.spool import Spool
from edge_agent.stage import serve_stage
from edge_agent.telemetry import MqttSettings, TelemetryPublisher
from models.errors import InvalidRequest
from models.generate import Continuation, TokenEvent, plain
from models.kvpred import KVReport
from models.sampling import SamplingParams
from models.serving import ServedModel
from models.skip import SkipReport
from models.streaming import iterate_in_thread
from models.threads import fitted
from tandem.files import write_private
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tandem.wire import (
    kv_variant_message,
    logprob_message,
    prompt_of,
    sampling_kwargs,
    set_kv_report,
    skip_variant_message,
    tools_of,
)

log = logging.getLogger("tandem.agent")
VERSION = "0.1.0"
COALESCE_MAX = 64  # queued messages the writer merges at once


def coalesce(messages: list[pb.AgentMessage]) -> list[pb.AgentMessage]:
    """The same replies in fewer messages: each work's queued TokenChunks of one choice become one
    (ids, text and logprobs concatenated, at the place of the first; a choice's last chunk, which
    carries its finish reason, closes it), so a busy agent sends what it has ready
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
        if chunk is None or chunk.index != msg.tokens.index or chunk.finish_reason:  # another choice, or its end
            open_chunks[msg.tokens.work_id] = msg.tokens
            out.append(msg)
        else:
            chunk.token_ids.extend(msg.tokens.token_ids)
            chunk.text += msg.tokens.text
            chunk.logprobs.extend(msg.tokens.logprobs)
            chunk.finish_reason = msg.tokens.finish_reason
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
    power_sensor: PowerSensor | None = None
    """Measures each request's energy (edge_agent.power.detect); None: estimated from power_active_w."""
    agent_version: str = ""
    """What the agent reports in its Hello ("": the package's VERSION); a flashed image may name its build."""


@dataclass(frozen=True)
class Credentials:
    device_id: str
    credential: str
    hub: str
    mqtt: MqttSettings | None
    device_hub: str = ""
    """host:port of the hub's device port, dialled with this device's certificate (mutual TLS); empty:
    the hub address serves this device (plaintext, or TLS without device certificates)."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-tandem-device-id", self.device_id), ("x-tandem-credential", self.credential))


class EnrollmentRejected(RuntimeError):
    """The hub refused the token or the saved credential: retrying will not help."""


def credentials_path(state_dir: Path) -> Path:
    return state_dir / "credentials.json"


def save_credentials(state_dir: Path, creds: Credentials) -> None:
    """Write the credential file readable by the owner only (0600), atomically."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(
        credentials_path(state_dir), json.dumps({**asdict(creds), "mqtt": asdict(creds.mqtt) if creds.mqtt else None})
    )


def load_credentials(state_dir: Path) -> Credentials | None:
    path = credentials_path(state_dir)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    mqtt = MqttSettings(**data["mqtt"]) if data.get("mqtt") else None
    return Credentials(data["device_id"], data["credential"], data["hub"], mqtt, data.get("device_hub", ""))


class Agent:
    def __init__(self, config: AgentConfig, engine: ServedModel, loader: ServedLoader | None = None) -> None:
        self.config, self.engine = config, engine
        self.loader = loader or bundle_served(engine)
        """Loads an over-the-air update's bundle to serve (edge_agent.ota); the default keeps `engine`'s pacing."""
        self.channel: grpc.aio.Channel | None = None
        """The channel for this device's own calls while run() runs (the work channel; an update
        fetches its bundle over it): to the device port, or the hub channel itself (_work_channel)."""
        self._dialled = ""  # the device port address self.channel dials ("": the hub channel)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue | None = None  # the open work channel's, None between channels
        self._unsent: list[pb.AgentMessage] = []  # update results that found no open channel
        self._commands: set[str] = set()  # update commands taken (QoS 1 delivers at least once)
        self._update_lock = asyncio.Lock()
        self._updates: set[asyncio.Task] = set()
        self.creds: Credentials | None = None
        self.telemetry: TelemetryPublisher | None = None
        self.connected = asyncio.Event()
        self.pending = 0  # works received and not finished: the queue depth
        self._cancels: dict[str, threading.Event] = {}
        self._stage_inputs: dict[str, queue.Queue] = {}
        """Split stages running here: each one's StageInputs from the hub (edge_agent.stage)."""
        self.max_concurrency = engine.max_concurrency
        """Works run at once: advertised in the Hello (the hub sends no more) and enforced here too."""
        self._slots = asyncio.Semaphore(self.max_concurrency)
        self._waiting: dict[str, asyncio.Task] = {}  # works waiting for a slot, by id
        self.notes: list[str] = []
        """What start-up found out (precision, calibration, emulation limits, power sensor), for people."""

    async def enroll(self, channel: grpc.aio.Channel) -> Credentials:
        """Saved credentials, or enroll with the token and save them."""
        saved = load_credentials(self.config.state_dir)
        if saved is not None and saved.hub == self.config.hub:
            return saved
        if not self.config.token:
            raise EnrollmentRejected("no saved credential for this hub and no enrollment token given (--token)")
        # Over TLS, a key of our own for mutual TLS: only its signing request leaves the device.
        key, csr = new_key_request(self.config.name) if self.config.tls_ca is not None else (None, b"")
        req = pb.EnrollRequest(
            token=self.config.token,
            name=self.config.name,
            profile=self.config.profile,
            models=[model_info(self.engine)],
            emulated=self.config.emulated,
            csr=csr,
        )
        try:
            resp = await pb_grpc.RegistryStub(channel).Enroll(req, timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                raise EnrollmentRejected(f"enrollment refused: {exc.details()}") from exc
            raise
        identity = None
        if resp.certificate and key is not None:  # the hub signed it: from now on we dial with it
            identity = save_identity(self.config.state_dir, key, resp.certificate, resp.ca_certificate)
        port = resp.device_port
        device_hub = device_address(self.config.hub, port) if identity is not None and port else ""
        mqtt = mqtt_settings(resp.mqtt, self.config.hub, identity)
        creds = Credentials(resp.device_id, resp.credential, self.config.hub, mqtt, device_hub)
        save_credentials(self.config.state_dir, creds)
        log.info("enrolled as %s", creds.device_id)
        return creds

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, reconnecting after any disconnect."""
        attempt = 0
        self._loop = asyncio.get_running_loop()
        if self.config.tls_ca is not None:
            creds = grpc.ssl_channel_credentials(self.config.tls_ca.read_bytes())
            channel_cm = grpc.aio.secure_channel(self.config.hub, creds)
        else:
            channel_cm = grpc.aio.insecure_channel(self.config.hub)
        async with channel_cm as channel:
            try:
                while not stop.is_set():
                    try:
                        await self._connect(channel, stop)
                        attempt = 0
                    except EnrollmentRejected:
                        raise
                    except grpc.aio.AioRpcError as exc:
                        if await self._lost(exc, channel):
                            continue  # the device port moved: dial the new one now
                    finally:
                        self.connected.clear()
                    attempt += 1
                    delay = min(self.config.backoff_max_s, 0.25 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
            finally:
                await self._close_work_channel(channel)
        for task in self._updates:
            task.cancel()
        await asyncio.gather(*self._updates, return_exceptions=True)
        if self.telemetry is not None:
            self.telemetry.stop()

    async def _connect(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        """Enroll unless saved credentials say we have, then serve one work channel until it ends,
        over the device port the credentials name now (a new channel when it moved) or `channel`."""
        if self.creds is None:
            self.creds = await self.enroll(channel)
            self._start_telemetry()
        if self.channel is None or self._dialled != self.creds.device_hub:
            await self._close_work_channel(channel)
            self.channel, self._dialled = self._work_channel(channel), self.creds.device_hub
        await self._serve(self.channel, stop)

    async def _lost(self, exc: grpc.aio.AioRpcError, channel: grpc.aio.Channel) -> bool:
        """After the work channel ended with `exc`: whether to reconnect at once (the device port
        moved), else after a backoff. EnrollmentRejected when the hub rejected our credential."""
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise EnrollmentRejected(f"the hub rejected this device's credential: {exc.details()}") from exc
        if exc.code() == grpc.StatusCode.UNAVAILABLE and await self._device_port_moved(channel):
            return True
        log.warning("work channel lost (%s); reconnecting", exc.code().name)
        return False

    async def _close_work_channel(self, channel: grpc.aio.Channel) -> None:
        work, self.channel = self.channel, None
        if work is not None and work is not channel:
            await work.close()

    def _work_channel(self, channel: grpc.aio.Channel) -> grpc.aio.Channel:
        """The channel for this device's own calls (the work channel, and any call naming the device):
        with a certificate from enrollment, one to the hub's device port presenting it (mutual TLS);
        else the hub channel itself. EnrollmentRejected when the certificate files have gone."""
        assert self.creds is not None
        if not self.creds.device_hub:
            return channel
        identity = load_identity(self.config.state_dir)
        if identity is None:
            raise EnrollmentRejected(
                f"this device enrolled with a certificate, but its key or certificate is missing from "
                f"{self.config.state_dir}; re-enroll: remove credentials.json there and run with a new --token"
            )
        return grpc.aio.secure_channel(self.creds.device_hub, identity.channel_credentials())

    async def _device_port_moved(self, channel: grpc.aio.Channel) -> bool:
        """After the device port refused us: whether the hub now has it elsewhere (followed, saved).

        Only the Welcome says where it is, and the port we know is the one that refused, so we ask
        the main port (`channel`), which needs no certificate: a hub with mutual TLS answers a work
        channel opened there with our credential by one Welcome, then refuses it
        (cloud_hub.servicers.WorkChannelServicer.Connect). Any other answer: it has not moved."""
        if self.creds is None or not self.creds.device_hub:
            return False
        stub = pb_grpc.WorkChannelStub(channel)
        call = stub.Connect(iter([self.hello()]), metadata=self.creds.metadata(), timeout=10)
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError:
            return False
        finally:
            call.cancel()
        welcome = msg is not grpc.aio.EOF and msg.WhichOneof("kind") == "welcome"
        return welcome and self._follow_device_port(msg.welcome)

    def _follow_device_port(self, welcome: pb.Welcome) -> bool:
        """The hub's device port, sent in every Welcome: saved when it moved (the next work channel
        dials it; the one open now, over the old port, serves on). Whether it moved. Only an agent
        enrolled with a certificate follows it: one without must re-enroll to use it."""
        if self.creds is None or not self.creds.device_hub or not welcome.device_port:
            return False
        address = device_address(self.config.hub, welcome.device_port)
        if address == self.creds.device_hub:
            return False
        log.info("the hub's device port is now %s", address)
        self.creds = replace(self.creds, device_hub=address)
        save_credentials(self.config.state_dir, self.creds)
        return True

    def _start_telemetry(self) -> None:
        if self.creds is None or self.creds.mqtt is None or self.telemetry is not None:
            return

        sensor = self.config.power_sensor
        gauge = PowerGauge(sensor) if sensor is not None else None

        def sample() -> dict:
            busy = self.pending > 0
            watts = gauge.read() if gauge is not None else None
            return {
                "load": min(1.0, self.pending),
                "queue_depth": max(0, self.pending - 1),
                # a sensor's reading where there is one; else the profile's active power while busy
                "power_w": watts if watts is not None else (self.config.power_active_w if busy else 0.0),
                "power_sensor": sensor.name if watts is not None else "",
            }

        spool = Spool(self.config.state_dir / "telemetry-spool.db", self.config.spool_max_records)
        self.telemetry = TelemetryPublisher(
            self.creds.mqtt, sample, self.config.telemetry_interval_s, spool=spool, on_command=self._command_arrived
        )
        self.telemetry.start()

    def _follow_broker(self, welcome: pb.Welcome) -> None:
        """The hub's broker address, sent at every work channel open: saved when it changed, and the
        telemetry publisher follows it (reconnecting now if it was down). The login stays our own."""
        if self.creds is None or self.creds.mqtt is None or not welcome.mqtt.host:
            return
        mqtt = followed_broker(self.creds.mqtt, welcome.mqtt, self.config.hub)
        if mqtt != self.creds.mqtt:
            log.info("the hub's broker is now at %s:%d", mqtt.host, mqtt.port)
            self.creds = replace(self.creds, mqtt=mqtt)
            save_credentials(self.config.state_dir, self.creds)
        if self.telemetry is not None:
            self.telemetry.follow(mqtt)

    async def _serve(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        assert self.creds is not None
        outbox: asyncio.Queue = asyncio.Queue()
        outbox.put_nowait(self.hello())
        for msg in self._unsent:  # update results from while no channel was open
            outbox.put_nowait(msg)
        self._unsent.clear()
        self._outbox = outbox

        async def outgoing():
            # None in the outbox ends it (put there when _serve ends): once the call has ended, nothing
            # else wakes gRPC's task reading this generator, which would wait on the queue until
            # collected, pending, its generator closed while running.
            while True:
                batch = [await outbox.get()]
                while len(batch) < COALESCE_MAX and not outbox.empty():
                    batch.append(outbox.get_nowait())
                end = next((i for i, m in enumerate(batch) if m is None), None)
                for msg in coalesce(batch if end is None else batch[:end]):
                    yield msg
                if end is not None:
                    return

        call = pb_grpc.WorkChannelStub(channel).Connect(outgoing(), metadata=self.creds.metadata())
        self.connected.set()
        tasks: set[asyncio.Task] = set()
        stopper = asyncio.ensure_future(stop.wait())
        nxt: asyncio.Future | None = None
        try:
            reader = call.__aiter__()
            while True:
                nxt = asyncio.ensure_future(reader.__anext__())
                done, _ = await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    return
                try:
                    msg = nxt.result()
                except StopAsyncIteration:
                    return
                self._dispatch(msg, outbox, tasks)
        finally:
            self._outbox = None
            call.cancel()  # a no-op once the call has ended
            outbox.put_nowait(None)  # ends outgoing(), which a call that ended already no longer reads
            for ev in self._cancels.values():
                ev.set()
            for inputs in self._stage_inputs.values():
                inputs.put(None)  # a split stage waiting for its next input sees the cancel now
            pending = [t for t in (stopper, nxt, *tasks) if t is not None]
            for t in pending:
                t.cancel()
            # Waited for here: a task still pending when the loop closes is destroyed pending, and an
            # error in one (nxt's, when stop and the call's end come together) must be retrieved.
            await asyncio.gather(*pending, return_exceptions=True)

    def _dispatch(self, msg: pb.HubMessage, outbox: asyncio.Queue, tasks: set[asyncio.Task]) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "work":
            task = asyncio.create_task(self._work(msg.work, outbox))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            work_id = msg.work.work_id
            self._waiting[work_id] = task  # until it has a slot (_work takes it out then)
            task.add_done_callback(lambda _: self._waiting.pop(work_id, None))
        elif kind == "cancel":
            self._cancel(msg.cancel.work_id)
        elif kind == "stage":
            inputs = self._stage_inputs.get(msg.stage.work_id)
            if inputs is not None:  # None: a stage that has ended (its late inputs are dropped)
                inputs.put(msg.stage)
        elif kind == "ping":
            outbox.put_nowait(pb.AgentMessage(pong=pb.Pong(sent_unix=msg.ping.sent_unix)))
        elif kind == "welcome":
            self._follow_broker(msg.welcome)
            self._follow_device_port(msg.welcome)

    def hello(self) -> pb.AgentMessage:
        """What this agent serves, as it tells the hub: first on each work channel, again after an update."""
        hello = pb.Hello(
            models=[model_info(self.engine)],
            max_concurrency=self.max_concurrency,
            agent_version=self.config.agent_version or VERSION,
        )
        return pb.AgentMessage(hello=hello)

    def _command_arrived(self, payload: bytes) -> None:
        """A message on the device's commands topic, in paho's thread: handled on the agent's loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_command, payload)

    def _on_command(self, payload: bytes) -> None:
        try:
            command = UpdateCommand.from_payload(payload)
        except ValueError as exc:
            log.warning("ignoring a malformed command: %s", exc)
            return
        if command.command_id in self._commands:
            return
        self._commands.add(command.command_id)
        task = asyncio.create_task(self.update(command))
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)

    async def update(self, command: UpdateCommand) -> pb.UpdateResult:
        """Fetch, verify and load `command`'s bundle and serve it from the next request on: requests
        running now finish on the model they started with (each takes `self.engine` once, at its
        start). Reports an UpdateResult to the hub, then, on success, a fresh Hello. A failure leaves
        the model served as it was. One update at a time."""
        async with self._update_lock:
            try:
                if self.channel is None or self.creds is None:
                    raise UpdateFailed("not connected to the hub")
                bundles = self.config.state_dir / "bundles"
                bundle = await fetch_bundle(self.channel, self.creds.metadata(), command, bundles)
                served = await asyncio.to_thread(load_update, self.loader, command, bundle)
            except UpdateFailed as exc:
                log.warning("update %s failed: %s", command.command_id, exc)
                result = pb.UpdateResult(command_id=command.command_id, ok=False, message=str(exc), model=command.model)
            else:
                self.engine = served
                save_served(self.config.state_dir, command.model, bundle)  # a restart serves it too
                message = f"serving {command.model} ({served.info['quant']}, version {command.version[:12]})"
                result = pb.UpdateResult(command_id=command.command_id, ok=True, message=message,
                                         model=command.model, version=command.version)  # fmt: skip
                log.info("update %s: %s", command.command_id, message)
            self._report(pb.AgentMessage(update=result))
            if result.ok:
                self._report(self.hello())
            return result

    def _report(self, msg: pb.AgentMessage) -> None:
        """Send `msg` on the open work channel; an UpdateResult waits for the next one if none is open
        (a Hello needs no keeping: each channel opens with a fresh one)."""
        if self._outbox is not None:
            self._outbox.put_nowait(msg)
        elif msg.WhichOneof("kind") == "update":
            self._unsent.append(msg)

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


def mqtt_settings(info: pb.MqttInfo, hub: str, identity: DeviceIdentity | None) -> MqttSettings | None:
    """How telemetry reaches the broker the hub named (None: it has none). With a TLS listener and
    our certificate: over TLS, at the host we dial the hub at (edge_agent.identity.hub_host); its
    plaintext listener is then for the hub's own machine only."""
    if not info.host:
        return None
    plain = MqttSettings(info.host, info.port, info.username, info.password, info.topic_prefix)
    if not info.tls_port or identity is None:
        return plain
    files = {"ca_file": str(identity.ca_file), "cert_file": str(identity.cert_file), "key_file": str(identity.key_file)}
    return replace(plain, host=hub_host(hub), port=info.tls_port, **files)


def followed_broker(current: MqttSettings, info: pb.MqttInfo, hub: str) -> MqttSettings:
    """`current` moved to the broker address a Welcome gives: its TLS port when we speak TLS to it,
    else its host and port. The login and the TLS files stay our own."""
    if current.ca_file and info.tls_port:
        return replace(current, host=hub_host(hub), port=info.tls_port)
    return replace(current, host=info.host, port=info.port)


def model_info(served: ServedModel) -> pb.ModelInfo:
    """What this agent advertises about `served`: its ModelInfo fields, the skip ratios its
    layer-skipping routers were trained for (and each one's measured agreement, the hub's to weigh
    under a quality_floor) and its KV-prediction variants, so that the hub sends
    requests with a skip_ratio or a kv_prediction only where they can be served. None with a step
    engine (edge_agent.engines): both run on the model's own route only (models.generate refuses
    them elsewhere). Read at each Hello: an update may bring routers or predictors or take them away."""
    return pb.ModelInfo(
        **served.info,
        skip_ratios=served.skip_ratios,
        kv_variants=[kv_variant_message(**vars(v)) for v in served.kv_variants],
        skip_variants=[skip_variant_message(**vars(v)) for v in served.skip_variants],
    )


def skip_metrics(metrics: pb.Metrics, report: SkipReport) -> None:
    """Write a request's layer-skipping report (models.skip.SkipReport) into its Metrics."""
    metrics.skipped_layers.extend(report.layers)
    metrics.lossless = report.lossless
    metrics.drafted, metrics.accepted = report.drafted, report.accepted


def token_chunk(work_id: str, ev: TokenEvent, prompt_ids: list[int]) -> pb.TokenChunk:
    """One generated token as its TokenChunk: its choice, text, finish and any logprobs (the
    prompt's, with its ids, on the first)."""
    chunk = pb.TokenChunk(
        work_id=work_id, token_ids=[ev.token_id], text=ev.text, index=ev.row, finish_reason=ev.finish_reason or ""
    )
    if ev.logprob is not None:
        chunk.logprobs.append(logprob_message(plain(ev.logprob)))
    if ev.prompt:
        chunk.prompt_logprobs.extend(logprob_message(plain(p)) for p in ev.prompt)
        chunk.prompt_token_ids.extend(prompt_ids)
    return chunk


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
