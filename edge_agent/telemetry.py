"""Telemetry from the agent over MQTT: status (retained, with a last will) and periodic samples.

The last will marks the device offline when its connection dies without a clean disconnect (a
killed process, a lost network): the broker publishes it, retained, so the hub sees the device
go offline within the keepalive window at worst and at once when the socket closes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_agent.spool import Spool

log = logging.getLogger("tandem.agent.telemetry")


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    username: str
    password: str
    topic_prefix: str
    """tandem/v1/devices/{device_id}"""
    ca_file: str = ""
    """TLS: the deployment's CA, the only issuer trusted for the broker; empty: plaintext."""
    cert_file: str = ""
    """TLS: this device's certificate, which the broker's TLS listener requires."""
    key_file: str = ""
    """TLS: its private key."""


def rss_mb() -> float:
    """Resident memory of this process, from /proc (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def temperature_c() -> float | None:
    """The first thermal zone's temperature, where the board exposes one."""
    try:
        return int(Path("/sys/class/thermal/thermal_zone0/temp").read_text()) / 1000
    except (OSError, ValueError):
        return None


def _with_seq(payload: str, seq: int) -> str:
    return payload[:-1] + f', "seq": {seq}}}' if payload.endswith("}") else payload


class TelemetryPublisher:
    """Samples every interval into the spool, and drains the spool to the broker in order.

    Every sample goes through the spool (QoS 1, deleted once the broker acknowledged it), so a
    broker outage only delays telemetry: it arrives in order when the broker is back, with at most
    the spool's bound kept (oldest dropped first). Each message carries its spool sequence number.

    `follow(settings)` moves the publisher to the broker address the hub gives at each work channel
    connect; the sampling thread applies it before its next sample, and it is the only thread that
    publishes. Records that a connection was still sending are in the spool until acknowledged, so
    they go to the new address, in order.
    """

    def __init__(
        self,
        settings: MqttSettings,
        sample: Callable[[], dict],
        interval_s: float = 1.0,
        keepalive_s: int = 5,
        spool: Spool | None = None,
        on_command: Callable[[bytes], None] | None = None,
    ) -> None:
        self.settings, self.sample, self.interval_s = settings, sample, interval_s
        self.spool = spool
        self.on_command = on_command
        """Called, in paho's network thread, with each message on the device's `commands` topic (the
        hub's over-the-air updates: edge_agent.ota); None: the topic is not subscribed."""
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._keepalive = keepalive_s
        self._lock = threading.Lock()  # the client and a pending follow(), between the sampler and stop()
        self._follow: MqttSettings | None = None
        self._client = self._new_client(settings)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="telemetry")

    def _new_client(self, settings: MqttSettings) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{settings.username}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(settings.username, settings.password)
        if settings.ca_file:  # verifies the broker's certificate and name; presents ours
            client.tls_set(
                ca_certs=settings.ca_file, certfile=settings.cert_file or None, keyfile=settings.key_file or None
            )
        client.will_set(f"{settings.topic_prefix}/status", "offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = lambda *a: self.connected.clear()
        # At most 5 s between tries: a restarted hub's broker (same address) hears from us that soon.
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        return client

    def topic(self, channel: str) -> str:
        return f"{self.settings.topic_prefix}/{channel}"

    def start(self) -> None:
        self._client.connect_async(self.settings.host, self.settings.port, keepalive=self._keepalive)
        self._client.loop_start()
        self._thread.start()

    def follow(self, settings: MqttSettings) -> None:
        """Publish to `settings` from the next sample on: a new connection when the address changed
        or the current one is down (the hub that sent it, and so its broker, is up), else nothing."""
        with self._lock:
            self._follow = settings

    def stop(self) -> None:
        """Clean shutdown: publish offline ourselves (a clean disconnect does not fire the will)."""
        self._stop.set()
        with self._lock:
            if self.connected.is_set():
                self._client.publish(self.topic("status"), "offline", qos=1, retain=True).wait_for_publish(2)
            self._client.disconnect()
            self._client.loop_stop()

    def _apply_follow(self) -> None:
        with self._lock:
            target, self._follow = self._follow, None
            if target is None or self._stop.is_set() or (target == self.settings and self.connected.is_set()):
                return
            old, self._client = self._client, self._new_client(target)
            old.disconnect()
            old.loop_stop()  # its callbacks are over: it can no longer clear `connected` for the new one
            self.connected.clear()
            self.settings = target
            self._client.connect_async(target.host, target.port, keepalive=self._keepalive)
            self._client.loop_start()
        log.info("telemetry to the broker at %s:%d", target.host, target.port)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):  # paho retries; a hub that is starting admits devices last
            log.warning("MQTT connect refused: %s", reason)
            return
        if self.on_command is not None:  # before "online": the hub sends commands to devices it sees online
            client.subscribe(self.topic("commands"), qos=1)
        client.publish(self.topic("status"), "online", qos=1, retain=True)
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if self.on_command is not None and message.topic == self.topic("commands"):
            try:
                self.on_command(message.payload)
            except Exception:  # paho's network thread must go on
                log.exception("command handler failed")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._apply_follow()
                self._tick()
            except Exception:  # one bad sample or publish must not end telemetry (and the replay) for good
                log.exception("telemetry sample failed")

    def _tick(self) -> None:
        """One sample: into the spool, then drain the spool (or, without one, publish it if connected)."""
        data = {
            **self.sample(),
            "memory_mb": rss_mb(),
            "temperature_c": temperature_c(),
            "ts": time.time(),
            "pid": os.getpid(),
        }
        if self.spool is None:
            if self.connected.is_set():
                self._client.publish(self.topic("telemetry"), json.dumps(data), qos=0)
            return
        self.spool.push(json.dumps(data))
        self._drain()

    def _drain(self) -> None:
        """Send spooled records in order while connected; stop at the first that is not acknowledged."""
        assert self.spool is not None
        while self.connected.is_set() and not self._stop.is_set():
            batch = self.spool.peek(200)
            if not batch:
                return
            for seq, payload in batch:
                info = self._client.publish(self.topic("telemetry"), _with_seq(payload, seq), qos=1)
                try:
                    info.wait_for_publish(2.0)
                except (RuntimeError, ValueError):  # not queued: the connection dropped meanwhile
                    return
                if not info.is_published():
                    return
                self.spool.ack(seq)
