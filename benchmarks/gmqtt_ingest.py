"""gmqtt behind our MQTT subscriber's interface: the client `benchmarks/hub_load.py --ingest gmqtt`
measures beside ours (docs/benchmarks.md, "The MQTT client: gmqtt measured, ours kept")."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cloud_hub.mqtt_codec import Message
from cloud_hub.mqtt_ingest import ConnectRefused, MqttError, SubscriberConfig, SubscribeRefused


class GmqttSubscriber:
    """`MqttSubscriber`'s interface on gmqtt (pure asyncio, MQTT v5), for `--ingest gmqtt`.

    Set up as gmqtt's fastest: a plain `on_message` with its optimistic acknowledgement (a QoS 1
    PUBACK before the message is handled; ours acknowledges after). gmqtt acknowledges after handling
    only for an async `on_message`, which costs a Task per message. gmqtt calls `on_message` once
    per message, synchronously for every packet of a read; they are collected and handed over in one
    call (`call_soon`), as ours does, so the hub counts them with one metric update per batch.
    Reconnects are gmqtt's own (a fixed delay); each session subscribes again in `on_connect`.
    """

    def __init__(self, config: SubscriberConfig, on_messages: Callable[[list[Message]], None]) -> None:
        import gmqtt  # only for --ingest gmqtt (a dev dependency)

        self.config, self.on_messages = config, on_messages
        self.connections = 0
        self.malformed_packets = 0  # gmqtt logs a malformed packet and goes on; it counts none
        self._client = gmqtt.Client(config.client_id, maximum_packet_size=config.max_packet_bytes)
        self._client.set_auth_credentials(config.username, config.password or None)
        self._client.set_config({"reconnect_delay": config.backoff_max_s})
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._subscriptions = [gmqtt.Subscription(f, qos=q) for f, q in config.subscriptions]
        self._subacks: list[int] = []
        self._subscribed = False
        self._first: asyncio.Future | None = None
        self._pending: list[Message] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def connected(self) -> bool:
        return self._subscribed

    async def start(self, timeout_s: float = 10.0) -> None:
        """Connected and subscribed, or `ConnectRefused` / `SubscribeRefused` / `MqttError` (as ours)."""
        from gmqtt.mqtt.handler import MQTTConnectError

        self._loop = asyncio.get_running_loop()
        self._first = self._loop.create_future()
        address, deadline, error = f"{self.config.host}:{self.config.port}", time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            try:
                connect = self._client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
                await asyncio.wait_for(connect, deadline - time.monotonic())
                await asyncio.wait_for(asyncio.shield(self._first), deadline - time.monotonic())
                return
            except MQTTConnectError as exc:
                raise ConnectRefused(address, exc.args[0]) from None
            except (OSError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(min(self.config.backoff_min_s, max(0.0, deadline - time.monotonic())))
        raise MqttError(f"could not connect to MQTT at {address} within {timeout_s} s: {error}")

    async def stop(self) -> None:
        """DISCONNECT (gmqtt then stops reconnecting) and close."""
        self._subscribed = False
        await self._client.disconnect()  # safe without a connection: gmqtt then sends nothing
        self._flush()

    def _on_connect(self, client: object, flags: int, rc: int, properties: dict) -> None:
        self._subacks = []
        if not self._client.subscriptions:
            self._client.subscribe(self._subscriptions)
        else:
            for sub in self._subscriptions:
                self._client.resubscribe(sub)

    def _on_subscribe(self, client: object, mid: int, codes: tuple[int, ...], properties: dict) -> None:
        self._subacks += codes
        if len(self._subacks) < len(self._subscriptions):
            return
        refused = [c for c in self._subacks if c >= 0x80]
        if refused and self._first is not None and not self._first.done():
            self._first.set_exception(SubscribeRefused(f"MQTT broker refused subscriptions: {refused}"))
            return
        self._subscribed = True
        self.connections += 1
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    def _on_disconnect(self, client: object, packet: object, exc: object = None) -> None:
        self._subscribed = False

    def _on_message(self, client: object, topic: str, payload: bytes, qos: int, properties: dict) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]
        self._pending.append(Message(topic, payload, qos, bool(properties["retain"])))

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            try:
                self.on_messages(batch)
            except Exception:  # as ours: a failing handler does not end the session
                logging.getLogger("tandem.hub.mqtt").exception("on_messages failed")
