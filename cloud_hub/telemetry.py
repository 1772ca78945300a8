"""Telemetry ingest: the hub subscribes to every device's telemetry and status topics.

The MQTT client (`cloud_hub.mqtt_ingest`) runs in the hub's event loop, so `on_telemetry` and
`on_status` are called directly, in the loop, and may touch fleet state without locks. Messages come
in batches (all that one socket read held); `on_message_count(n)` is called once per batch so that
a metric costs one update per read rather than one per message.

Accepted: `tandem/v1/devices/{id}/telemetry` with a JSON object, `tandem/v1/devices/{id}/status`
with "online" or "offline". Anything else is counted in `malformed` and dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import ClassVar, Protocol

from cloud_hub.mqtt_codec import Message
from cloud_hub.mqtt_ingest import MqttSubscriber, SubscriberConfig

log = logging.getLogger("tandem.hub.telemetry")
PREFIX = "tandem/v1/devices/"
_STATUSES = frozenset(("online", "offline"))
# json.loads(bytes) first sniffs the encoding; decoding UTF-8 ourselves and calling the decoder
# directly saves about a third of the per-message parse cost, which is most of the ingest's time.
_decode_json = json.JSONDecoder().decode


class Subscriber(Protocol):
    """What the ingest needs of an MQTT client: `MqttSubscriber`'s public surface."""

    @property
    def connected(self) -> bool: ...

    @property
    def malformed_packets(self) -> int: ...

    async def start(self, timeout_s: float = 10.0) -> None: ...

    async def stop(self) -> None: ...


SubscriberFactory = Callable[[SubscriberConfig, Callable[[list[Message]], None]], Subscriber]


class TelemetryIngest:
    """Subscribe, validate, and hand each device message to the callbacks.

    `start()` raises `cloud_hub.mqtt_ingest.MqttError` (a RuntimeError) when the broker cannot be
    reached or refuses the login; afterwards the client reconnects by itself.
    """

    subscriber_factory: ClassVar[SubscriberFactory] = MqttSubscriber
    """The MQTT client; `benchmarks/hub_load.py --ingest` sets another in its hub process to compare."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        on_telemetry: Callable[[str, dict], None],
        on_status: Callable[[str, str], None],
        keepalive_s: int = 10,
    ) -> None:
        self.on_telemetry, self.on_status = on_telemetry, on_status
        self.received = 0
        self.malformed = 0
        self.on_message_count: Callable[[int], None] = lambda n: None
        # Statuses at QoS 1: a device's last will ("offline") must not be lost on the way to us.
        subscriptions = ((PREFIX + "+/telemetry", 0), (PREFIX + "+/status", 1))
        config = SubscriberConfig(host, port, username, password, subscriptions, keepalive_s=keepalive_s)
        self._client = type(self).subscriber_factory(config, self._messages)

    @property
    def connected(self) -> bool:
        return self._client.connected

    @property
    def malformed_packets(self) -> int:
        """Protocol-level errors from the broker (each cost a reconnect), as opposed to bad messages."""
        return self._client.malformed_packets

    async def start(self, timeout_s: float = 10.0) -> None:
        await self._client.start(timeout_s)

    async def stop(self) -> None:
        await self._client.stop()

    def _messages(self, batch: list[Message]) -> None:
        self.received += len(batch)
        for message in batch:
            if not self._one(message.topic, message.payload):
                self.malformed += 1
        self.on_message_count(len(batch))

    def _one(self, topic: str, payload: bytes) -> bool:
        """Validate and dispatch one message; False if it is malformed."""
        if not topic.startswith(PREFIX):
            return False
        device_id, _, channel = topic[len(PREFIX) :].partition("/")
        if not device_id:
            return False
        try:
            if channel == "telemetry":
                data = _decode_json(payload.decode())
                if not isinstance(data, dict):
                    return False
                self.on_telemetry(device_id, data)
            elif channel == "status":
                status = payload.decode()
                if status not in _STATUSES:
                    return False
                self.on_status(device_id, status)
            else:
                return False
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            return False
        return True
