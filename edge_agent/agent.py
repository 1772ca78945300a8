"""The edge agent: enroll once, dial out to the hub, serve work, publish telemetry.

Devices sit behind NAT, so the agent opens the connection: a bidirectional WorkChannel stream on
which the hub sends work and the agent streams tokens back. Any disconnect (hub restart, network
loss) is followed by a reconnect with jittered exponential backoff; only a rejected credential
stops the agent, since retrying cannot fix it.

Here: the connection (enrollment, the reconnect loop, the work channel's writer and reader,
following the hub's device port and broker) and telemetry. The Agent's other parts are mixed in
from their own modules: running works (edge_agent.works.WorkRunner) and over-the-air updates
(edge_agent.updates.Updater). Its saved enrollment is edge_agent.credentials; the protobufs it
builds, edge_agent.messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from edge_agent.credentials import Credentials, EnrollmentRejected, load_credentials, save_credentials
from edge_agent.identity import device_address, load_identity, new_key_request, save_identity
from edge_agent.messages import coalesce, followed_broker, model_info, mqtt_settings
from edge_agent.ota import ServedLoader, bundle_served
from edge_agent.power import PowerSensor
from edge_agent.power_meter import PowerGauge
from edge_agent.spool import Spool
from edge_agent.telemetry import TelemetryPublisher
from edge_agent.updates import Updater
from edge_agent.works import WorkRunner
from models.serving import ServedModel
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

log = logging.getLogger("tandem.agent")
VERSION = "0.1.0"
COALESCE_MAX = 64  # queued messages the writer merges at once


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


class Agent(WorkRunner, Updater):
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
