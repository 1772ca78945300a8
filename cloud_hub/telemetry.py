"""Telemetry ingest: the hub subscribes to every device's telemetry and status topics.

paho-mqtt runs its network loop in its own thread; callbacks hand each parsed message to the
`on_telemetry` / `on_status` callables, which the hub wraps with `loop.call_soon_threadsafe` so
that fleet state is only touched from the event loop. Malformed messages are counted and dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt

log = logging.getLogger("tandem.hub.telemetry")
PREFIX = "tandem/v1/devices/"


class TelemetryIngest:
    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        on_telemetry: Callable[[str, dict], None],
        on_status: Callable[[str, str], None],
    ) -> None:
        self.on_telemetry, self.on_status = on_telemetry, on_status
        self.received = 0
        self.malformed = 0
        self.on_message_count: Callable[[], None] = lambda: None
        self.connected = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"tandem-hub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self._client.username_pw_set(username, password)
        self._client.on_connect = self._connected
        self._client.on_message = self._message
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._host, self._port = host, port

    def start(self, timeout_s: float = 10.0) -> None:
        self._client.connect_async(self._host, self._port, keepalive=10)
        self._client.loop_start()
        if not self.connected.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"telemetry ingest could not connect to MQTT at {self._host}:{self._port}")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _connected(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("MQTT connect refused: %s", reason)
            return
        client.subscribe([(PREFIX + "+/telemetry", 0), (PREFIX + "+/status", 1)])
        self.connected.set()

    def _message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        self.on_message_count()
        parts = msg.topic[len(PREFIX) :].split("/")
        if not msg.topic.startswith(PREFIX) or len(parts) != 2:
            self.malformed += 1
            return
        device_id, channel = parts
        try:
            if channel == "status":
                status = msg.payload.decode()
                if status not in ("online", "offline"):
                    raise ValueError(status)
                self.on_status(device_id, status)
            elif channel == "telemetry":
                data = json.loads(msg.payload)
                if not isinstance(data, dict):
                    raise ValueError("telemetry must be a JSON object")
                self.on_telemetry(device_id, data)
        except (ValueError, UnicodeDecodeError):
            self.malformed += 1
