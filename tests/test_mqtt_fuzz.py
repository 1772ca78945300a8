"""Fuzz our MQTT v5 decoder (`cloud_hub.mqtt_codec`, and `mqtt_ingest`'s protocol that frames a byte
stream into it): every generated packet decodes or raises `MalformedPacket`, never anything else.

Hypothesis builds streams of valid packets (PUBLISH at QoS 0 and 1, CONNACK, SUBACK, DISCONNECT,
PINGRESP; properties encoded by paho, an independent encoder), then mutates some (`MUTATIONS`):
bodies cut short under a consistent header, frames cut short, remaining lengths that are 5 bytes
long, unterminated or over the maximum, unknown property identifiers, strings that are not UTF-8,
length fields past the end, changed, inserted and deleted bytes, random first bytes, random bodies.
A stream left valid must decode to exactly what was encoded.

The default suite runs a fixed sample of `FAST_PACKETS`; `-m slow` runs `SLOW_PACKETS` fresh ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cloud_hub import mqtt_codec as codec
from cloud_hub.mqtt_codec import MalformedPacket, Message
from cloud_hub.mqtt_ingest import MqttSubscriber, SubscriberConfig, _Protocol

mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed")
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

FAST_PACKETS = 2_000
SLOW_PACKETS = 100_000
MAX_BYTES = 1 << 20  # SubscriberConfig's default Maximum Packet Size
STREAM_PACKETS = (1, 5)  # packets a stream holds, at least and at most
BAD_UTF8 = (
    b"\xff",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xe2\x82",
    b"\xf4\x90\x80\x80",
)  # invalid, overlong, surrogate, cut
BAD_PROPERTY_IDS = (0x00, 0x04, 0x05, 0x07, 0x0A, 0x0C, 0x10, 0x14, 0x1E, 0x20, 0x2B, 0x7F, 0x80, 0xFF)


@dataclass
class Packet:
    """One generated frame and, while it is unmutated, what the decoder must return for it."""

    data: bytes
    expected: object = None
    mutated: bool = False


def frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + codec.varint(len(body)) + body


def utf8(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


# -- valid packets ----------------------------------------------------------------------------------

texts = st.text(min_size=1, max_size=24)
pairs = st.lists(st.tuples(texts, texts), min_size=1, max_size=3)


@st.composite
def publish_properties(draw: st.DrawFn) -> bytes:
    props = Properties(PacketTypes.PUBLISH)
    if draw(st.booleans()):
        props.MessageExpiryInterval = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        props.ContentType = draw(texts)
    if draw(st.booleans()):
        props.CorrelationData = draw(st.binary(max_size=20))
    if draw(st.booleans()):
        props.SubscriptionIdentifier = [draw(st.integers(1, 268_435_455))]
    if draw(st.booleans()):
        props.UserProperty = draw(pairs)
    if draw(st.booleans()):
        props.PayloadFormatIndicator = draw(st.integers(0, 1))
    return props.pack()


@st.composite
def publish(draw: st.DrawFn) -> Packet:
    topic = draw(texts)
    qos, retain, packet_id = draw(st.integers(0, 1)), draw(st.booleans()), draw(st.integers(1, 0xFFFF))
    # Sizes on both sides of the 1- and 2-byte remaining-length boundaries (127, 16,383), large ones rarer.
    size = draw(st.sampled_from([0] * 7 + [16_200]) | st.integers(0, 300)) + draw(st.integers(0, 400))
    seed = draw(st.binary(min_size=1, max_size=16))
    payload = (seed * (size // len(seed) + 1))[:size]
    body = utf8(topic.encode()) + (packet_id.to_bytes(2, "big") if qos else b"") + draw(publish_properties()) + payload
    expected = (Message(topic, payload, qos, retain), packet_id if qos else None)
    return Packet(frame((codec.PUBLISH << 4) | (qos << 1) | int(retain), body), expected)


@st.composite
def connack(draw: st.DrawFn) -> Packet:
    props, decoded = Properties(PacketTypes.CONNACK), {}
    if draw(st.booleans()):
        props.ServerKeepAlive = decoded[0x13] = draw(st.integers(0, 0xFFFF))
    if draw(st.booleans()):
        props.ReasonString = decoded[0x1F] = draw(texts)
    if draw(st.booleans()):
        props.MaximumPacketSize = decoded[0x27] = draw(st.integers(1, 268_435_455))
        props.AssignedClientIdentifier = decoded[0x12] = draw(texts)
    if draw(st.booleans()):
        props.UserProperty = decoded[0x26] = draw(pairs)
    code = draw(st.sampled_from([0x00, 0x80, 0x86, 0x87, 0x88, 0x8A, 0x9F]))
    body = bytes([draw(st.integers(0, 1)), code]) + props.pack()
    return Packet(frame(codec.CONNACK << 4, body), (code, decoded))


@st.composite
def suback(draw: st.DrawFn) -> Packet:
    props, decoded = Properties(PacketTypes.SUBACK), {}
    if draw(st.booleans()):
        props.ReasonString = decoded[0x1F] = draw(texts)
    packet_id = draw(st.integers(0, 0xFFFF))
    codes = bytes(draw(st.lists(st.sampled_from([0, 1, 0x80, 0x87, 0x8F]), max_size=4)))
    body = packet_id.to_bytes(2, "big") + props.pack() + codes
    return Packet(frame(codec.SUBACK << 4, body), (packet_id, codes, decoded))


@st.composite
def disconnect(draw: st.DrawFn) -> Packet:
    code = draw(st.sampled_from([0x00, 0x04, 0x81, 0x8B, 0x8D, 0x8E, 0x9C]))
    form = draw(st.sampled_from(["empty", "code", "code+props"]))
    if form == "empty":
        return Packet(b"\xe0\x00", (0, {}))
    if form == "code":
        return Packet(frame(codec.DISCONNECT << 4, bytes([code])), (code, {}))
    props = Properties(PacketTypes.DISCONNECT)
    props.ReasonString = reason = draw(texts)
    return Packet(frame(codec.DISCONNECT << 4, bytes([code]) + props.pack()), (code, {0x1F: reason}))


valid_packets = st.one_of(
    publish(), publish(), publish(), connack(), suback(), disconnect(), st.just(Packet(b"\xd0\x00", "pingresp"))
)


# -- mutations: (draw, first byte, body, whole frame, a position in the body) -> the new frame -------

Mutation = Callable[[st.DrawFn, int, bytes, bytes, int], bytes]


def _long_field(draw: st.DrawFn, first: int, body: bytes, data: bytes, pos: int) -> bytes:
    """A 2-byte length or a varint length that claims more than is left."""
    field = draw(st.sampled_from([b"\xff\xff", b"\x7f", b"\xff\x7f", b"\x00\x10"]))
    return frame(first, body[:pos] + field + body[pos + 2 :])


def _bad_property(draw: st.DrawFn, first: int, body: bytes, data: bytes, pos: int) -> bytes:
    """A property block with an unknown identifier, put where a block may be read."""
    block = b"\x05" + bytes([draw(st.sampled_from(BAD_PROPERTY_IDS))]) + draw(st.binary(min_size=4, max_size=4))
    return frame(first, body[:pos] + block + body[pos:])


MUTATIONS: dict[str, Mutation] = {
    "cut_body": lambda draw, first, body, data, pos: frame(first, body[:pos]),  # a consistent header
    "cut_frame": lambda draw, first, body, data, pos: data[: draw(st.integers(1, len(data) - 1))],
    "long_varint": lambda draw, first, body, data, pos: bytes([first]) + b"\xff\xff\xff\xff\x7f" + body,
    "open_varint": lambda draw, first, body, data, pos: bytes([first]) + b"\x80" * draw(st.integers(1, 3)),
    "over_max": lambda draw, first, body, data, pos: (
        bytes([first]) + codec.varint(draw(st.integers(MAX_BYTES + 1, 268_435_455))) + body
    ),
    "bad_property": _bad_property,
    "bad_utf8": lambda draw, first, body, data, pos: frame(
        first, body[:pos] + draw(st.sampled_from(BAD_UTF8)) + body[pos:]
    ),
    "long_field": _long_field,
    "change": lambda draw, first, body, data, pos: frame(
        first, body[:pos] + bytes([draw(st.integers(0, 255))]) + body[pos + 1 :]
    ),
    "insert": lambda draw, first, body, data, pos: frame(
        first, body[:pos] + draw(st.binary(min_size=1, max_size=4)) + body[pos:]
    ),
    "delete": lambda draw, first, body, data, pos: frame(first, body[:pos] + body[pos + draw(st.integers(1, 4)) :]),
    "first_byte": lambda draw, first, body, data, pos: frame(draw(st.integers(0, 255)), body),
    "random": lambda draw, first, body, data, pos: frame(draw(st.integers(0, 255)), draw(st.binary(max_size=64))),
}


@st.composite
def mutate(draw: st.DrawFn, packet: Packet) -> Packet:
    """`packet` unchanged (nearly half the time) or with one of the `MUTATIONS`."""
    name = draw(st.sampled_from([None] * len(MUTATIONS) + list(MUTATIONS)))
    if name is None:
        return packet
    data = packet.data
    head = 2 + next(i for i, b in enumerate(data[1:5]) if not b & 0x80)  # after the remaining length
    body = data[head:]
    pos = draw(st.integers(0, max(0, len(body) - 1)))
    return Packet(MUTATIONS[name](draw, data[0], body, data, pos), None, mutated=True)


streams = st.lists(valid_packets.flatmap(mutate), min_size=STREAM_PACKETS[0], max_size=STREAM_PACKETS[1])


# -- the decoder under test -------------------------------------------------------------------------


def _or_none(decode: Callable[..., object], *args: object) -> object:
    try:
        return decode(*args)
    except MalformedPacket:
        return None


def decode_frames(stream: bytes) -> list[object]:
    """Split `stream` and run every decoder on every frame (each must cope with any body); the
    result kept for a frame is the one its type selects, None where that raised MalformedPacket.
    """
    frames, _, error = codec.split_packets(stream, MAX_BYTES)
    assert error is None or isinstance(error, MalformedPacket)
    results: list[object] = []
    for first, start, end in frames:
        by_type = {
            codec.PUBLISH: _or_none(codec.parse_publish, stream, first, start, end),
            codec.CONNACK: _or_none(codec.parse_connack, stream, start, end),
            codec.SUBACK: _or_none(codec.parse_suback, stream, start, end),
            codec.DISCONNECT: _or_none(codec.parse_disconnect, stream, start, end),
            codec.PINGRESP: "pingresp" if start == end else None,
        }
        _or_none(codec.parse_properties, stream, start, end)
        results.append(by_type.get(first >> 4))
    return results


class _Transport:
    def __init__(self) -> None:
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def feed_protocol(stream: bytes, chunk: int) -> list[Message]:
    """The stream through `_Protocol.data_received` in `chunk`-byte reads; the messages delivered.

    Call it in a running event loop. A MalformedPacket ends in a closed transport (the protocol
    handles it); any other exception escapes.
    """
    got: list[Message] = []
    owner = MqttSubscriber(SubscriberConfig("h", 1, "u", "p", (("t/#", 1),)), got.extend)
    proto, transport = _Protocol(owner), _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.expect(codec.CONNACK), proto.expect(codec.SUBACK)  # so that one of each is not unsolicited
    for pos in range(0, len(stream), chunk):
        proto.data_received(stream[pos : pos + chunk])
    assert owner.malformed_packets in (0, 1) and (transport.closing or not owner.malformed_packets)
    return got


# -- the tests --------------------------------------------------------------------------------------


def run_fuzz(packets: int, derandomize: bool) -> int:
    """Decode generated streams until `packets` packets have gone through; returns how many did."""
    count = [0]

    # Streams hold 1-5 packets, about 2.5 on average (measured): 2 a stream is a safe floor.
    @settings(
        max_examples=packets // 2,
        deadline=None,
        database=None,
        derandomize=derandomize,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(streams, st.integers(1, 16) | st.integers(17, 70_000))
    def one_stream(packets_: list[Packet], chunk: int) -> None:
        stream = b"".join(p.data for p in packets_)
        results = decode_frames(stream)
        if not any(p.mutated for p in packets_):  # every frame is one packet, in order, as encoded
            assert results == [p.expected for p in packets_]
        feed_protocol(stream, chunk)
        count[0] += len(packets_)

    one_stream()
    while count[0] < packets and not derandomize:  # a derandomized run would repeat its examples
        one_stream()
    return count[0]


async def test_fuzz_decoder_sample(caplog: pytest.LogCaptureFixture) -> None:
    """A fixed sample in the default suite (async: `_Protocol` needs a running loop)."""
    caplog.set_level(logging.ERROR, "tandem.hub.mqtt")  # not a warning for every packet dropped
    assert run_fuzz(FAST_PACKETS, derandomize=True) >= FAST_PACKETS


@pytest.mark.slow
async def test_fuzz_decoder_100k_packets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "tandem.hub.mqtt")
    count = run_fuzz(SLOW_PACKETS, derandomize=False)
    print(f"{count} generated packets decoded")  # shown with -rP
    assert count >= SLOW_PACKETS


async def test_valid_publishes_through_the_protocol_give_the_encoded_messages() -> None:
    """The protocol path on unmutated PUBLISH streams, in reads of every size: the same messages."""

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(st.lists(publish(), min_size=1, max_size=4), st.integers(1, 40_000))
    def check(packets_: list[Packet], chunk: int) -> None:
        stream = b"".join(p.data for p in packets_)
        assert feed_protocol(stream, chunk) == [p.expected[0] for p in packets_]  # type: ignore[index]

    check()
