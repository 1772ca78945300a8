"""MQTT v5 packets for a subscriber: encoders for what it sends, decoders for what it receives.

Pure functions over bytes, so that the parser can be tested without a socket or a broker. Only the
subset a QoS 0/1 subscriber needs is covered: CONNECT, SUBSCRIBE, PUBACK, PINGREQ, DISCONNECT out;
CONNACK, SUBACK, PUBLISH, PINGRESP, DISCONNECT in. Anything else the broker sends (QoS 2 flows,
AUTH) cannot happen with the options we send, so it is treated as a malformed stream.

Every decoder raises `MalformedPacket` on bytes that break the spec; the caller drops the connection
(MQTT v5 section 4.13: a malformed packet ends the network connection).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # normal disconnection: reason code 0 and no properties may be omitted

# Property identifier -> wire type, MQTT v5 section 2.2.2.2. The types are all that is needed to skip
# a property we have no use for; "pair" is a User Property (two strings).
_PROPERTY_TYPES = {
    0x01: "byte", 0x02: "u32", 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "varint", 0x11: "u32",
    0x12: "str", 0x13: "u16", 0x15: "str", 0x16: "bin", 0x17: "byte", 0x18: "u32", 0x19: "byte",
    0x1A: "str", 0x1C: "str", 0x1F: "str", 0x21: "u16", 0x22: "u16", 0x23: "u16", 0x24: "byte",
    0x25: "byte", 0x26: "pair", 0x27: "u32", 0x28: "byte", 0x29: "byte", 0x2A: "byte",
}  # fmt: skip
PROP_SERVER_KEEP_ALIVE = 0x13
PROP_REASON_STRING = 0x1F
_PROP_MAXIMUM_PACKET_SIZE = 0x27
_MAX_VARINT = 268_435_455  # four 7-bit groups


class MalformedPacket(ValueError):
    """Bytes from the broker that are not a valid MQTT v5 packet (or not one a subscriber can get)."""


class Message(NamedTuple):
    """One application message from a PUBLISH (a tuple: built once per message on the hot path)."""

    topic: str
    """The topic it was published to (never empty: we allow no topic aliases)."""
    payload: bytes
    """The application payload, as sent."""
    qos: int = 0
    """0 or 1 (we subscribe with at most 1)."""
    retain: bool = False
    """True for a retained message delivered because we subscribed."""


# -- encoding -------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    """MQTT Variable Byte Integer: 7 bits per byte, low group first, high bit = more bytes follow."""
    if not 0 <= n <= _MAX_VARINT:
        raise ValueError(f"{n} does not fit an MQTT variable byte integer")
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    raw = s.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("MQTT strings are limited to 65535 bytes")
    return struct.pack("!H", len(raw)) + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


def connect_packet(client_id: str, username: str, password: str, keepalive_s: int, max_packet_bytes: int) -> bytes:
    """CONNECT with clean start, user name and password, and a Maximum Packet Size.

    No Topic Alias Maximum property is sent, so it is 0 and the broker must put the full topic in
    every PUBLISH. Maximum Packet Size makes the broker drop (not send us) oversized messages.
    """
    flags = 0x02 | (0x80 if username else 0) | (0x40 if password else 0)
    props = bytes([_PROP_MAXIMUM_PACKET_SIZE]) + struct.pack("!I", max_packet_bytes)
    header = _utf8("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive_s) + varint(len(props)) + props
    payload = _utf8(client_id)
    if username:
        payload += _utf8(username)
    if password:
        payload += _utf8(password)  # binary data has the same 2-byte length prefix as a string
    return _packet(CONNECT << 4, header + payload)


def subscribe_packet(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (fixed header flags 0b0010) for (topic filter, max QoS) pairs.

    Retain handling 0: retained messages are sent at every subscribe, so device statuses arrive
    again after each reconnect.
    """
    body = struct.pack("!H", packet_id) + b"\x00"
    for topic_filter, qos in filters:
        if qos not in (0, 1):
            raise ValueError(f"QoS {qos} is not supported (0 or 1)")
        body += _utf8(topic_filter) + bytes([qos])
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def puback_packet(packet_id: int) -> bytes:
    """PUBACK, success: the reason code and properties may be omitted (remaining length 2)."""
    return b"\x40\x02" + struct.pack("!H", packet_id)


def disconnect_packet(reason_code: int) -> bytes:
    """DISCONNECT with a reason code, e.g. 0x81 (Malformed Packet) before we drop the connection."""
    return _packet(DISCONNECT << 4, bytes([reason_code, 0]))


# -- decoding -------------------------------------------------------------------------------------


def _read_varint(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """(value, position after it), or None when the bytes run out before the integer ends."""
    value, shift = 0, 0
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 28:
            raise MalformedPacket("variable byte integer longer than 4 bytes")
    return None


def split_packets(
    data: bytes | bytearray, max_bytes: int
) -> tuple[list[tuple[int, int, int]], int, MalformedPacket | None]:
    """Complete packets at the start of `data` as (first byte, body start, body end), where the
    incomplete tail begins (the caller keeps it for the next read), and the framing error that
    stopped the split, if any (a remaining length that is invalid or larger than `max_bytes`).

    The error is returned rather than raised so that the packets before it are still handled.
    """
    packets: list[tuple[int, int, int]] = []
    pos, n = 0, len(data)
    try:
        while pos + 2 <= n:
            got = _read_varint(data, pos + 1, n)
            if got is None:
                break
            length, start = got
            if length > max_bytes:
                raise MalformedPacket(f"packet of {length} bytes exceeds the {max_bytes}-byte maximum")
            if start + length > n:
                break
            packets.append((data[pos], start, start + length))
            pos = start + length
    except MalformedPacket as exc:
        return packets, pos, exc
    return packets, pos, None


def parse_publish(data: bytes | bytearray, first: int, start: int, end: int) -> tuple[Message, int | None]:
    """A PUBLISH body: the message and its packet id (None at QoS 0).

    The properties are skipped by their length without being read one by one: none of them changes
    what we do with telemetry, and a Topic Alias cannot be used since we allowed none (an empty
    topic is therefore malformed). This is the hot path, one call per message.
    """
    qos = (first >> 1) & 0x03
    if qos > 1:
        raise MalformedPacket(f"PUBLISH with QoS {qos}; we subscribe with at most QoS 1")
    if start + 2 > end:
        raise MalformedPacket("PUBLISH too short for a topic")
    topic_end = start + 2 + ((data[start] << 8) | data[start + 1])
    if topic_end > end or topic_end == start + 2:
        raise MalformedPacket("PUBLISH topic is empty or longer than the packet")
    try:
        topic = data[start + 2 : topic_end].decode()
    except UnicodeDecodeError as exc:
        raise MalformedPacket("PUBLISH topic is not UTF-8") from exc
    pos, packet_id = topic_end, None
    if qos:
        if pos + 2 > end:
            raise MalformedPacket("QoS 1 PUBLISH without a packet id")
        packet_id = (data[pos] << 8) | data[pos + 1]
        if packet_id == 0:
            raise MalformedPacket("PUBLISH packet id 0")
        pos += 2
    got = _read_varint(data, pos, end)
    if got is None or got[0] + got[1] > end:
        raise MalformedPacket("PUBLISH properties run past the packet")
    payload = bytes(data[got[0] + got[1] : end])
    return Message(topic, payload, qos, bool(first & 0x01)), packet_id


def parse_properties(data: bytes | bytearray, pos: int, end: int) -> tuple[dict[int, object], int]:
    """A property block at `pos` (length first): {identifier: value} and the position after it.

    User Properties (which may repeat) are collected into a list of pairs; values we never read are
    still decoded, which checks that the block is well formed.
    """
    got = _read_varint(data, pos, end)
    if got is None or got[0] + got[1] > end:
        raise MalformedPacket("properties run past the packet")
    length, pos = got
    stop, props = pos + length, {}
    while pos < stop:
        ident = data[pos]
        kind = _PROPERTY_TYPES.get(ident)
        if kind is None:
            raise MalformedPacket(f"unknown property 0x{ident:02x}")
        value, pos = _read_property(data, kind, pos + 1, stop)
        if kind == "pair":
            props.setdefault(ident, []).append(value)  # type: ignore[union-attr]
        else:
            props[ident] = value
    return props, stop


def _read_property(data: bytes | bytearray, kind: str, pos: int, stop: int) -> tuple[object, int]:
    if kind == "varint":
        got = _read_varint(data, pos, stop)
        if got is None:
            raise MalformedPacket("truncated property")
        return got
    if kind == "pair":
        key, pos = _read_property(data, "str", pos, stop)
        value, pos = _read_property(data, "str", pos, stop)
        return (key, value), pos
    size = {"byte": 1, "u16": 2, "u32": 4}.get(kind)
    if size is None:  # str or bin: a 2-byte length, then the bytes
        if pos + 2 > stop:
            raise MalformedPacket("truncated property")
        pos, size = pos + 2, (data[pos] << 8) | data[pos + 1]
    if pos + size > stop:
        raise MalformedPacket("truncated property")
    raw = bytes(data[pos : pos + size])
    if kind == "str":
        try:
            return raw.decode(), pos + size
        except UnicodeDecodeError as exc:
            raise MalformedPacket("property string is not UTF-8") from exc
    return (raw if kind == "bin" else int.from_bytes(raw, "big")), pos + size


def parse_connack(data: bytes | bytearray, start: int, end: int) -> tuple[int, dict]:
    """CONNACK body: (reason code, properties); codes of 0x80 and above are refusals."""
    if end - start < 3:
        raise MalformedPacket("CONNACK too short")
    if data[start] & 0xFE:
        raise MalformedPacket("CONNACK flags have reserved bits set")
    return data[start + 1], parse_properties(data, start + 2, end)[0]


def parse_suback(data: bytes | bytearray, start: int, end: int) -> tuple[int, bytes, dict]:
    """SUBACK body: (packet id, one reason code per filter, properties)."""
    if end - start < 3:
        raise MalformedPacket("SUBACK too short")
    packet_id = (data[start] << 8) | data[start + 1]
    props, pos = parse_properties(data, start + 2, end)
    return packet_id, bytes(data[pos:end]), props


def parse_disconnect(data: bytes | bytearray, start: int, end: int) -> tuple[int, dict]:
    """DISCONNECT body: (reason code, properties); an empty body means 0 (section 3.14.2.1)."""
    if end == start:
        return 0, {}
    props = parse_properties(data, start + 1, end)[0] if end > start + 1 else {}
    return data[start], props
