"""A minimal MQTT v5 subscriber on asyncio, for the hub's telemetry ingest.

Why not paho-mqtt: its network thread reads each packet with several 1-byte `recv` calls and
handles one packet per `select`, and every message then has to cross into the event loop with
`call_soon_threadsafe` (a self-pipe write each). Here an `asyncio.Protocol` runs in the hub's own
loop: each `data_received` parses every complete packet in the chunk, hands all its messages to
`on_messages` in one call, and answers all its QoS 1 PUBLISHes with one write.

    sub = MqttSubscriber(SubscriberConfig(host, port, user, password, (("a/#", 1),)), on_messages)
    await sub.start()   # connected and subscribed, or ConnectRefused / SubscribeRefused / MqttError
    ...
    await sub.stop()    # DISCONNECT, then close

After `start()` the subscriber reconnects by itself, with jittered exponential backoff, whenever the
connection ends (broker restart, keepalive timeout, a malformed packet); each session starts clean
and subscribes again, so retained messages are delivered again too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from cloud_hub import mqtt_codec as codec
from cloud_hub.mqtt_codec import MalformedPacket, Message

log = logging.getLogger("tandem.hub.mqtt")

_REASONS = {
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x83: "implementation specific error", 0x84: "unsupported protocol version",
    0x85: "client identifier not valid", 0x86: "bad user name or password", 0x87: "not authorized",
    0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned", 0x8B: "server shutting down",
    0x8C: "bad authentication method", 0x8D: "keep alive timeout", 0x8E: "session taken over",
    0x8F: "topic filter invalid", 0x95: "packet too large", 0x97: "quota exceeded",
    0x9C: "use another server", 0x9D: "server moved", 0x9F: "connection rate exceeded",
    0xA2: "wildcard subscriptions not supported",
}  # fmt: skip


def reason_text(code: int, detail: object = None) -> str:
    """'0x86 (bad user name or password)', plus the broker's Reason String when it sent one."""
    text = f"0x{code:02x} ({_REASONS.get(code, 'unknown reason')})"
    return f"{text}: {detail}" if detail else text


class MqttError(RuntimeError):
    """The subscriber could not connect or subscribe (raised by `start()`)."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a failure reason code; retrying the same login will not help."""

    def __init__(self, address: str, code: int, detail: object = None) -> None:
        super().__init__(f"MQTT broker at {address} refused the connection: {reason_text(code, detail)}")
        self.reason_code = code


class SubscribeRefused(MqttError):
    """The broker refused one of the subscriptions (usually the ACL)."""


@dataclass(frozen=True)
class SubscriberConfig:
    """Where to connect, as whom, and what to subscribe to."""

    host: str
    """Broker address."""
    port: int
    """Broker TCP port."""
    username: str
    """MQTT user name ("" for none)."""
    password: str = field(repr=False)
    """MQTT password ("" for none); never logged."""
    subscriptions: tuple[tuple[str, int], ...]
    """(topic filter, maximum QoS 0 or 1) pairs, all sent in one SUBSCRIBE."""
    client_id: str = field(default_factory=lambda: f"tandem-hub-{uuid.uuid4().hex[:8]}")
    """Client identifier, kept across reconnects."""
    keepalive_s: int = 30
    """Keep Alive sent in CONNECT; the broker's Server Keep Alive overrides it."""
    connect_timeout_s: float = 5.0
    """Bound on the TCP connect, and on waiting for each of CONNACK and SUBACK."""
    backoff_min_s: float = 0.2
    """First reconnect delay; doubles per failed attempt, each drawn uniformly from [d/2, d]."""
    backoff_max_s: float = 5.0
    """Largest reconnect delay."""
    max_packet_bytes: int = 1 << 20
    """Maximum Packet Size we announce: the broker drops larger messages instead of sending them."""


class _Protocol(asyncio.Protocol):
    """One connection: buffers bytes, parses every complete packet per read, resolves the waiters."""

    def __init__(self, owner: MqttSubscriber) -> None:
        self._owner = owner
        self._buf = bytearray()
        self._waiters: dict[int, asyncio.Future] = {}  # packet type (CONNACK, SUBACK) -> its waiter
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.last_received = time.monotonic()
        self.end_reason = "connection closed by the broker"

    def expect(self, packet_type: int) -> asyncio.Future:
        """A future for the next packet of this type (CONNACK or SUBACK); fails if the connection ends."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters[packet_type] = fut
        return fut

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.end_reason = f"connection lost: {exc}"
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(MqttError(self.end_reason))
        self._waiters.clear()
        if not self.closed.done():
            self.closed.set_result(self.end_reason)

    def data_received(self, data: bytes) -> None:
        if self.closed.done() or self.transport is None or self.transport.is_closing():
            return
        self.last_received = time.monotonic()
        buf = self._buf
        if buf:
            buf += data
            data = buf  # type: ignore[assignment]
        messages: list[Message] = []
        acks: list[bytes] = []
        try:
            packets, tail, error = codec.split_packets(data, self._owner.config.max_packet_bytes)
            for first, start, end in packets:
                self._packet(data, first, start, end, messages, acks)
            if error is not None:
                raise error
        except MalformedPacket as exc:
            self._deliver(messages, acks)
            self._drop(exc)
            return
        if data is buf:  # trimmed in place: a packet arriving in many reads is not copied whole at each
            del buf[:tail]
        else:
            self._buf = bytearray(data[tail:])
        self._deliver(messages, acks)

    def _packet(self, data: bytes, first: int, start: int, end: int, messages: list, acks: list) -> None:
        if first >> 4 == codec.PUBLISH:
            message, packet_id = codec.parse_publish(data, first, start, end)
            messages.append(message)
            if packet_id is not None:
                acks.append(codec.puback_packet(packet_id))
        elif first == codec.PINGRESP << 4 and start == end:
            pass
        elif first == codec.CONNACK << 4:
            self._resolve(codec.CONNACK, codec.parse_connack(data, start, end))
        elif first == codec.SUBACK << 4:
            self._resolve(codec.SUBACK, codec.parse_suback(data, start, end))
        elif first == codec.DISCONNECT << 4:
            code, props = codec.parse_disconnect(data, start, end)
            self.end_reason = f"broker sent DISCONNECT {reason_text(code, props.get(codec.PROP_REASON_STRING))}"
            self.transport.close()  # type: ignore[union-attr]
        else:
            raise MalformedPacket(f"unexpected packet 0x{first:02x} for a QoS 0/1 subscriber")

    def _resolve(self, packet_type: int, value: object) -> None:
        fut = self._waiters.pop(packet_type, None)
        if fut is None:
            raise MalformedPacket(f"unsolicited packet type {packet_type}")
        if not fut.done():
            fut.set_result(value)

    def _deliver(self, messages: list[Message], acks: list[bytes]) -> None:
        """Hand the messages over, then acknowledge the QoS 1 ones (at least once: after handling)."""
        if messages:
            self._owner.deliver(messages)
        if acks and not self.transport.is_closing():  # type: ignore[union-attr]
            self.transport.write(b"".join(acks))  # type: ignore[union-attr]

    def _drop(self, exc: MalformedPacket) -> None:
        """Spec 4.13: on a malformed packet, send DISCONNECT 0x81 and close; the owner reconnects."""
        self._owner.malformed_packets += 1
        self.end_reason = f"malformed packet from the broker: {exc}"
        log.warning("%s; reconnecting", self.end_reason)
        self._buf = bytearray()
        self.transport.write(codec.disconnect_packet(0x81))  # type: ignore[union-attr]
        self.transport.close()  # type: ignore[union-attr]


class MqttSubscriber:
    """Connects, subscribes, and keeps doing so; see the module docstring.

    `on_messages` runs in the event loop with every message of one read (a non-empty list); an
    exception from it is logged and does not end the connection. QoS 1 messages are acknowledged
    after it returns. Counters: `connections` (sessions that got subscribed), `malformed_packets`.
    """

    def __init__(self, config: SubscriberConfig, on_messages: Callable[[list[Message]], None]) -> None:
        self.config = config
        self.on_messages = on_messages
        self.connections = 0
        self.malformed_packets = 0
        self._address = f"{config.host}:{config.port}"
        self._protocol: _Protocol | None = None
        self._task: asyncio.Task | None = None
        self._first: asyncio.Future | None = None
        self._subscribed = False
        self._packet_id = 0
        self._last_error = "no attempt finished yet"

    @property
    def connected(self) -> bool:
        """True while a session is up and subscribed."""
        return self._subscribed

    async def start(self, timeout_s: float = 10.0) -> None:
        """Return once connected and subscribed; from then on reconnect in the background.

        Raises ConnectRefused or SubscribeRefused when the broker says no (the subscriber is stopped),
        and MqttError when no session was set up within `timeout_s` (the broker unreachable).
        """
        if self._task is not None:
            raise MqttError("subscriber already started")
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"mqtt-subscriber-{self.config.client_id}")
        try:
            await asyncio.wait_for(asyncio.shield(self._first), timeout_s)
        except TimeoutError:
            await self.stop()
            error = f"could not connect to MQTT at {self._address} within {timeout_s} s: {self._last_error}"
            raise MqttError(error) from None
        except MqttError:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Send DISCONNECT (so the broker does not treat this as a failure) and stop reconnecting."""
        proto, task, self._task = self._protocol, self._task, None
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            proto.end_reason = "stopped"
            proto.transport.write(codec.DISCONNECT_PACKET)
            proto.transport.close()  # flushes the DISCONNECT first
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def deliver(self, messages: list[Message]) -> None:
        try:
            self.on_messages(messages)
        except Exception:  # the callback's bug must not cost the connection
            log.exception("MQTT message handler failed on %d messages", len(messages))

    async def _run(self) -> None:
        delay = self.config.backoff_min_s
        while True:
            try:
                ended = await self._session()
                log.warning("MQTT session with %s ended (%s); reconnecting", self._address, ended)
                delay = self.config.backoff_min_s
            except (ConnectRefused, SubscribeRefused) as exc:
                if not self._first.done():  # type: ignore[union-attr]
                    self._first.set_exception(exc)  # type: ignore[union-attr]
                    return
                self._last_error = str(exc)
                log.error("%s; retrying", exc)
            except (OSError, MqttError, TimeoutError) as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.log(logging.WARNING if self.connections else logging.DEBUG, "MQTT connect failed: %s", exc)
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self.config.backoff_max_s)

    async def _session(self) -> str:
        """One connection: CONNECT, SUBSCRIBE, then keep alive until it ends; returns why it ended."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        connecting = loop.create_connection(lambda: _Protocol(self), cfg.host, cfg.port)
        transport, proto = await asyncio.wait_for(connecting, cfg.connect_timeout_s)
        self._protocol = proto
        try:
            keepalive = await self._handshake(transport, proto)
            self._subscribed = True
            self.connections += 1
            if not self._first.done():  # type: ignore[union-attr]
                self._first.set_result(None)  # type: ignore[union-attr]
            return await self._keep_alive(transport, proto, keepalive)
        finally:
            self._subscribed = False
            self._protocol = None
            if not transport.is_closing():
                transport.abort()

    async def _handshake(self, transport: asyncio.BaseTransport, proto: _Protocol) -> int:
        """CONNECT then SUBSCRIBE; returns the keepalive in force (the broker may impose its own)."""
        cfg, timeout = self.config, self.config.connect_timeout_s
        connack = proto.expect(codec.CONNACK)
        packet = codec.connect_packet(cfg.client_id, cfg.username, cfg.password, cfg.keepalive_s, cfg.max_packet_bytes)
        transport.write(packet)  # type: ignore[attr-defined]
        code, props = await asyncio.wait_for(connack, timeout)
        if code >= 0x80:
            raise ConnectRefused(self._address, code, props.get(codec.PROP_REASON_STRING))
        keepalive = int(props.get(codec.PROP_SERVER_KEEP_ALIVE, cfg.keepalive_s))
        self._packet_id = self._packet_id % 0xFFFF + 1
        suback = proto.expect(codec.SUBACK)
        transport.write(codec.subscribe_packet(self._packet_id, list(cfg.subscriptions)))  # type: ignore[attr-defined]
        packet_id, codes, props = await asyncio.wait_for(suback, timeout)
        if packet_id != self._packet_id or len(codes) != len(cfg.subscriptions):
            raise MqttError(f"SUBACK does not match our SUBSCRIBE (id {packet_id}, {len(codes)} codes)")
        refused = [(f, reason_text(c)) for (f, _), c in zip(cfg.subscriptions, codes, strict=True) if c >= 0x80]
        if refused:
            raise SubscribeRefused(f"MQTT broker at {self._address} refused subscriptions: {refused}")
        return keepalive

    async def _keep_alive(self, transport: asyncio.BaseTransport, proto: _Protocol, keepalive: int) -> str:
        """PINGREQ every keepalive/2; a connection silent for a whole keepalive is dead (dropped)."""
        if keepalive <= 0:
            return await proto.closed
        while True:
            await asyncio.wait([proto.closed], timeout=keepalive / 2)
            if proto.closed.done():
                return proto.closed.result()
            if time.monotonic() - proto.last_received > keepalive:
                proto.end_reason = f"nothing from the broker for {keepalive} s"
                return proto.end_reason
            transport.write(codec.PINGREQ_PACKET)  # type: ignore[attr-defined]
