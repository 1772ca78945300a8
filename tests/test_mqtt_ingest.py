"""Our asyncio MQTT v5 subscriber against the real Mosquitto, with paho-mqtt clients publishing, and its
parser on hand-built byte streams (properties encoded by paho, an independent encoder).

Every wait is bounded by WAIT_S.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from cloud_hub import mqtt_codec as codec
from cloud_hub.broker import BrokerConfig, ManagedBroker
from cloud_hub.broker_files import device_topic
from cloud_hub.mqtt_codec import Message
from cloud_hub.mqtt_ingest import ConnectRefused, MqttError, MqttSubscriber, SubscriberConfig, _Protocol
from cloud_hub.telemetry import TelemetryIngest

mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed")
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

WAIT_S = 5.0
FILTERS = (("tandem/v1/devices/+/telemetry", 0), ("tandem/v1/devices/+/status", 1))


# -- helpers --------------------------------------------------------------------------------------


class Collector:
    """on_messages target: keeps every message, lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.batches = 0

    def __call__(self, batch: list[Message]) -> None:
        self.batches += 1
        self.messages.extend(batch)

    async def wait(self, predicate: Callable[[list[Message]], bool], timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; got {self.messages[-5:]} ({len(self.messages)} messages)")
            await asyncio.sleep(0.01)


class Publisher:
    """A paho MQTT v5 device client on its own network thread."""

    def __init__(self, broker: ManagedBroker, username: str, password: str) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT_S)  # QoS 1: the broker's PUBACK; QoS 0: written to the socket

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _config(broker: ManagedBroker, **kw: object) -> SubscriberConfig:
    base = {"username": broker.hub_username, "password": broker.hub_password, "subscriptions": FILTERS}
    return SubscriberConfig(broker.host, broker.port, **{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture
def device(broker: ManagedBroker) -> Iterator[tuple[str, Publisher]]:
    """A fresh device account and a connected publisher for it."""
    device_id, password = f"dev-{uuid.uuid4().hex[:10]}", f"tdc_{uuid.uuid4().hex}"
    broker.add_user(device_id, password)
    pub = Publisher(broker, device_id, password)
    yield device_id, pub
    pub.close()


@pytest.fixture
async def subscriber(broker: ManagedBroker) -> AsyncIterator[tuple[MqttSubscriber, Collector]]:
    collector = Collector()
    sub = MqttSubscriber(_config(broker), collector)
    await sub.start(WAIT_S)
    yield sub, collector
    await sub.stop()


# -- against Mosquitto ----------------------------------------------------------------------------


async def test_qos0_and_qos1_messages_arrive(subscriber: tuple, device: tuple[str, Publisher]) -> None:
    sub, got = subscriber
    device_id, pub = device
    telemetry, status = device_topic(device_id, "telemetry"), device_topic(device_id, "status")
    await asyncio.to_thread(pub.publish, telemetry, b'{"load": 0.5}', 0)
    # 100 QoS 1 messages: Mosquitto keeps at most 20 unacknowledged in flight per client, so they all
    # arrive only if our PUBACKs reach it.
    for i in range(100):
        await asyncio.to_thread(pub.publish, status, f"s{i}".encode(), 1)
    await got.wait(lambda ms: sum(m.topic == status for m in ms) == 100)
    assert Message(telemetry, b'{"load": 0.5}', 0, False) in got.messages
    assert [m.payload for m in got.messages if m.topic == status] == [f"s{i}".encode() for i in range(100)]
    assert all(m.qos == 1 for m in got.messages if m.topic == status)
    assert sub.connected and sub.malformed_packets == 0


async def test_retained_status_arrives_on_subscribe(broker: ManagedBroker, device: tuple[str, Publisher]) -> None:
    device_id, pub = device
    await asyncio.to_thread(pub.publish, device_topic(device_id, "status"), b"online", 1, True)
    got = Collector()
    sub = MqttSubscriber(_config(broker), got)
    await sub.start(WAIT_S)
    try:
        await got.wait(lambda ms: any(m.topic == device_topic(device_id, "status") for m in ms))
        retained = next(m for m in got.messages if m.topic == device_topic(device_id, "status"))
        assert retained.payload == b"online" and retained.retain
    finally:
        await sub.stop()


async def test_wrong_password_is_a_clear_error(broker: ManagedBroker) -> None:
    sub = MqttSubscriber(_config(broker, password="wrong"), Collector())
    with pytest.raises(ConnectRefused) as refused:
        await sub.start(WAIT_S)
    assert refused.value.reason_code in (0x86, 0x87)  # bad user name or password / not authorized
    assert "refused the connection: 0x8" in str(refused.value) and "wrong" not in str(refused.value)


async def test_unreachable_broker_times_out_with_the_reason() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    sub = MqttSubscriber(SubscriberConfig("127.0.0.1", port, "u", "p", FILTERS), Collector())
    with pytest.raises(MqttError, match=r"could not connect .* within 1\.0 s: ConnectionRefusedError"):
        await sub.start(1.0)


async def test_reconnects_after_broker_restart(tmp_path: Path) -> None:
    broker = ManagedBroker(BrokerConfig(tmp_path))
    broker.start()
    broker.add_user("dev-r", "tdc_restart")
    got = Collector()
    sub = MqttSubscriber(_config(broker, backoff_max_s=0.5), got)
    try:
        await sub.start(WAIT_S)
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)  # same port and hub password; devices kept
        pub = Publisher(broker, "dev-r", "tdc_restart")
        try:
            await asyncio.to_thread(pub.publish, device_topic("dev-r", "status"), b"online", 1, True)
            await got.wait(lambda ms: any(m.payload == b"online" for m in ms), timeout=10)
            assert sub.connections == 2
            for i in range(5):
                await asyncio.to_thread(pub.publish, device_topic("dev-r", "telemetry"), json.dumps({"i": i}), 0)
            await got.wait(lambda ms: sum(m.topic.endswith("/telemetry") for m in ms) == 5)
        finally:
            pub.close()
    finally:
        await sub.stop()
        broker.stop()


async def test_keepalive_pings_keep_the_session_and_stop_disconnects(broker: ManagedBroker) -> None:
    """Mosquitto drops a client silent for 1.5 keepalives; our PINGREQs every keepalive/2 prevent that."""
    sub = MqttSubscriber(_config(broker, keepalive_s=1), Collector())
    await sub.start(WAIT_S)
    try:
        await asyncio.sleep(3.2)
        assert sub.connected and sub.connections == 1
    finally:
        await sub.stop()
    # stop() sends DISCONNECT: Mosquitto logs "disconnected." (not "closed its connection.", a bare close).
    line = f"Client {sub.config.client_id} disconnected.".encode()
    deadline = time.monotonic() + WAIT_S
    while line not in broker.log_path.read_bytes():
        assert time.monotonic() < deadline, "no clean DISCONNECT in the broker's log"
        await asyncio.sleep(0.02)


async def test_ingest_validates_and_counts_malformed(broker: ManagedBroker, device: tuple[str, Publisher]) -> None:
    device_id, pub = device
    telemetry: list[tuple[str, dict]] = []
    statuses: list[tuple[str, str]] = []
    counted: list[int] = []
    ingest = TelemetryIngest(
        broker.host,
        broker.port,
        broker.hub_username,
        broker.hub_password,
        on_telemetry=lambda d, data: telemetry.append((d, data)),
        on_status=lambda d, s: statuses.append((d, s)),
    )
    ingest.on_message_count = counted.append
    await ingest.start(WAIT_S)
    try:
        t, s = device_topic(device_id, "telemetry"), device_topic(device_id, "status")
        for topic, payload in [(t, b"not json"), (t, b"[1, 2]"), (t, b"\xff"), (s, b"maybe"), (s, b"\xff")]:
            await asyncio.to_thread(pub.publish, topic, payload, 1)
        await asyncio.to_thread(pub.publish, t, b'{"load": 0.25}', 1)
        await asyncio.to_thread(pub.publish, s, b"offline", 1)
        deadline = time.monotonic() + WAIT_S
        while (device_id, "offline") not in statuses and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Other tests' devices may have left retained statuses on this broker: they are valid messages.
        assert ingest.received == sum(counted) >= 7 and ingest.malformed == 5
        assert telemetry == [(device_id, {"load": 0.25})] and [s for s in statuses if s[0] == device_id] == [
            (device_id, "offline")
        ]
        assert ingest.connected and ingest.malformed_packets == 0
    finally:
        await ingest.stop()
    assert not ingest.connected


def test_ingest_drops_topics_outside_the_device_tree() -> None:
    seen: list = []
    ingest = TelemetryIngest("127.0.0.1", 1, "u", "p", lambda *a: seen.append(a), lambda *a: seen.append(a))
    ok = Message("tandem/v1/devices/d1/telemetry", b"{}")
    bad = ["other/v1/devices/d1/telemetry", "tandem/v1/devices//telemetry", "tandem/v1/devices/d1/commands"]
    ingest._messages([ok, *(Message(t, b"{}") for t in bad)])
    assert ingest.received == 4 and ingest.malformed == 3 and seen == [("d1", {})]


# -- the parser on byte streams, no broker -------------------------------------------------------


def _publish(topic: str | bytes, payload: bytes, qos: int, packet_id: int, props: bytes, retain: bool) -> bytes:
    raw = topic.encode() if isinstance(topic, str) else topic
    body = struct.pack("!H", len(raw)) + raw + (struct.pack("!H", packet_id) if qos else b"") + props + payload
    return codec._packet((codec.PUBLISH << 4) | (qos << 1) | int(retain), body)


def _props(**values: object) -> bytes:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props.pack()


def _stream(n: int, rng: random.Random) -> tuple[bytes, list[Message], list[bytes]]:
    """n PUBLISHes (mixed QoS, retain, properties, payload sizes incl. > 127 and > 16383 bytes) and PINGRESPs."""
    out, messages, acks = bytearray(), [], []
    for i in range(n):
        qos, retain = i % 2, i % 5 == 0
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 5, 200, 20_000])))
        props = _props(UserProperty=[("k", f"v{i}")], MessageExpiryInterval=60) if i % 3 else b"\x00"
        topic = f"tandem/v1/devices/d{i}/telemetry"
        out += _publish(topic, payload, qos, i + 1, props, retain)
        messages.append(Message(topic, payload, qos, retain))
        if qos:
            acks.append(codec.puback_packet(i + 1))
        if i % 7 == 0:
            out += b"\xd0\x00"
    return bytes(out), messages, acks


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def _protocol() -> tuple[_Protocol, Collector, FakeTransport, MqttSubscriber]:
    got = Collector()
    owner = MqttSubscriber(SubscriberConfig("h", 1, "u", "p", FILTERS), got)
    proto, transport = _Protocol(owner), FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, got, transport, owner


@pytest.mark.parametrize("chunking", ["whole", "byte_by_byte", "random"])
async def test_fragmented_stream_parses_to_the_same_messages(chunking: str) -> None:
    rng = random.Random(7)
    data, expected, acks = _stream(60 if chunking != "byte_by_byte" else 12, rng)
    sizes = {"whole": [len(data)], "byte_by_byte": [1] * len(data)}.get(chunking)
    if sizes is None:
        sizes = [rng.randint(1, 40_000) for _ in range(len(data))]
    proto, got, transport, owner = _protocol()
    pos = 0
    for size in sizes:
        if pos >= len(data):
            break
        proto.data_received(data[pos : pos + size])
        pos += size
    assert got.messages == expected
    assert bytes(transport.written) == b"".join(acks)
    assert owner.malformed_packets == 0 and not transport.closing
    if chunking == "whole":
        assert got.batches == 1


async def test_connack_and_suback_properties_are_decoded() -> None:
    proto, _, _, _ = _protocol()
    props = Properties(PacketTypes.CONNACK)
    props.ServerKeepAlive, props.ReasonString, props.UserProperty = 7, "hello", [("a", "b"), ("c", "d")]
    connack = proto.expect(codec.CONNACK)
    suback = proto.expect(codec.SUBACK)
    sub_props = Properties(PacketTypes.SUBACK)
    sub_props.ReasonString = "ok"
    stream = codec._packet(0x20, b"\x00\x00" + props.pack()) + codec._packet(
        0x90, b"\x00\x05" + sub_props.pack() + b"\x00\x01"
    )
    for b in stream:
        proto.data_received(bytes([b]))
    code, decoded = connack.result()
    assert code == 0 and decoded[codec.PROP_SERVER_KEEP_ALIVE] == 7 and decoded[codec.PROP_REASON_STRING] == "hello"
    assert decoded[0x26] == [("a", "b"), ("c", "d")]
    assert suback.result() == (5, b"\x00\x01", {codec.PROP_REASON_STRING: "ok"})


@pytest.mark.parametrize(
    "packet",
    [
        _publish("t/x", b"p", 0, 0, b"\x00", False)[:1] + b"\xff\xff\xff\xff\x7f",  # 5-byte remaining length
        bytes([0x36]) + _publish("t/x", b"p", 0, 0, b"\x00", False)[1:],  # QoS 3
        _publish("", b"p", 0, 0, b"\x00", False),  # empty topic: an alias we never allowed
        _publish("t/x", b"", 0, 0, b"\x05\x01", False),  # properties longer than the packet
        _publish(b"t/\xff", b"p", 0, 0, b"\x00", False),  # topic not UTF-8
        b"\x20\x03\x00\x00\x00",  # CONNACK nobody asked for
        b"\xf0\x00",  # AUTH
    ],
)
async def test_malformed_packet_drops_the_connection(packet: bytes) -> None:
    proto, got, transport, owner = _protocol()
    good = _publish("t/ok", b"first", 0, 0, b"\x00", False)
    proto.data_received(good + packet + good)
    assert [m.payload for m in got.messages] == [b"first"]  # what came before is delivered
    assert owner.malformed_packets == 1 and transport.closing
    assert bytes(transport.written) == codec.disconnect_packet(0x81)
    proto.data_received(good)  # nothing is parsed after the drop
    assert len(got.messages) == 1


def test_varint_round_trips() -> None:
    for n in (0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455):
        encoded = codec.varint(n)
        assert codec._read_varint(encoded, 0, len(encoded)) == (n, len(encoded))
    with pytest.raises(ValueError):
        codec.varint(268_435_456)
