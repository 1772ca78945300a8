"""ManagedBroker against the real Mosquitto binary: accounts, ACL isolation between devices, reloads
and shutdown, seen through paho-mqtt MQTT v5 clients.

Negative checks ("B's message never reaches A") do not just sleep: each is followed by a control
message that must arrive after the forbidden one would have, because the broker handles one client's
packets in order and delivers to one subscriber in order. Every wait is bounded by WAIT_S.
"""

from __future__ import annotations

import base64
import os
import pwd
import queue
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloud_hub.broker import BrokerConfig, BrokerError, ManagedBroker, find_mosquitto
from cloud_hub.broker_files import HUB_USERNAME, device_topic, hash_password

mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed")

WAIT_S = 5.0
GRACE_S = 0.3  # extra time for a straggler after the control message arrived
needs_mosquitto = pytest.mark.skipif(
    find_mosquitto() is None, reason="mosquitto binary not found (Debian: apt-get install mosquitto)"
)


class Peer:
    """A paho MQTT v5 client on its own network thread; CONNACK, SUBACKs, PUBACKs and messages are queued."""

    def __init__(self, broker: ManagedBroker, username: str | None, password: str | None) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{username or 'anon'}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,  # a refused client must stay refused, not retry in the background
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._connacks: queue.Queue = queue.Queue()
        self._subacks: queue.Queue = queue.Queue()
        self._pubacks: queue.Queue = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self._connacks.put(rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self._subacks.put((mid, rcs))
        self.client.on_publish = lambda c, u, mid, rc, props: self._pubacks.put((mid, rc))
        self.client.on_message = lambda c, u, msg: self.messages.put((msg.topic, msg.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.connack = self._connacks.get(timeout=WAIT_S)

    def subscribe(self, *topics: str) -> None:
        _, mid = self.client.subscribe([(t, 1) for t in topics])
        got_mid, codes = self._subacks.get(timeout=WAIT_S)
        assert got_mid == mid and len(codes) == len(topics)

    def publish(self, topic: str, payload: bytes) -> object:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(WAIT_S)
        mid, code = self._pubacks.get(timeout=WAIT_S)
        assert mid == info.mid
        return code

    def next_message(self, timeout: float = WAIT_S) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def drain(self) -> list[tuple[str, bytes]]:
        """Everything received so far, after a short grace period for stragglers."""
        time.sleep(GRACE_S)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def connect(broker: ManagedBroker) -> Iterator[Callable[[str | None, str | None], Peer]]:
    peers: list[Peer] = []

    def _connect(username: str | None, password: str | None) -> Peer:
        peers.append(Peer(broker, username, password))
        return peers[-1]

    yield _connect
    for p in peers:
        p.close()


@pytest.fixture
def hub(broker: ManagedBroker, connect: Callable[..., Peer]) -> Peer:
    peer = connect(broker.hub_username, broker.hub_password)
    assert not peer.connack.is_failure
    peer.subscribe("tandem/v1/#")
    return peer


@pytest.fixture
def new_device(broker: ManagedBroker) -> Callable[[], tuple[str, str]]:
    """Registers a fresh device account and returns (device_id, password)."""

    def _new() -> tuple[str, str]:
        device_id, password = f"dev-{uuid.uuid4().hex[:10]}", f"tdc_{uuid.uuid4().hex}"
        broker.add_user(device_id, password)
        return device_id, password

    return _new


# -- tests ----------------------------------------------------------------------------------------


def test_hub_publishes_and_subscribers_receive(
    broker: ManagedBroker, connect: Callable[..., Peer], hub: Peer, new_device: Callable[[], tuple[str, str]]
) -> None:
    device_id, password = new_device()
    device = connect(device_id, password)
    device.subscribe(f"tandem/v1/devices/{device_id}/#")
    topic = device_topic(device_id, "commands")
    assert not connect(broker.hub_username, broker.hub_password).publish(topic, b"run").is_failure
    assert hub.next_message() == (topic, b"run")
    assert device.next_message() == (topic, b"run")


def test_device_publishes_under_own_topic(connect: Callable[..., Peer], hub: Peer, new_device: Callable) -> None:
    device_id, password = new_device()
    device = connect(device_id, password)
    assert not device.connack.is_failure
    topic = device_topic(device_id, "telemetry")
    assert not device.publish(topic, b'{"load": 0.5}').is_failure
    assert hub.next_message() == (topic, b'{"load": 0.5}')


def test_device_cannot_publish_as_another(connect: Callable[..., Peer], hub: Peer, new_device: Callable) -> None:
    (a_id, a_pw), (b_id, _) = new_device(), new_device()
    a = connect(a_id, a_pw)
    assert a.publish(device_topic(b_id, "telemetry"), b"forged").is_failure  # MQTT v5 PUBACK: not authorised
    assert a.publish(f"tandem/v1/hub/{a_id}", b"forged").is_failure  # nor anywhere outside its subtree
    control = device_topic(a_id, "telemetry")
    assert not a.publish(control, b"control").is_failure
    assert hub.next_message() == (control, b"control")  # the forged ones were sent first, yet nothing came before
    assert hub.drain() == []


def test_device_cannot_read_another(
    broker: ManagedBroker, connect: Callable[..., Peer], hub: Peer, new_device: Callable
) -> None:
    (a_id, a_pw), (b_id, b_pw) = new_device(), new_device()
    a, b = connect(a_id, a_pw), connect(b_id, b_pw)
    # Mosquitto 2.0.11 grants these subscriptions and filters each message by the read ACL at delivery.
    a.subscribe(f"tandem/v1/devices/{b_id}/#", "tandem/v1/#", "#", f"tandem/v1/devices/{a_id}/#")
    b_topic = device_topic(b_id, "status")
    assert not b.publish(b_topic, b"online").is_failure
    assert hub.next_message() == (b_topic, b"online")  # routed: A's copy, if any, was queued by now
    own = device_topic(a_id, "commands")
    connect(broker.hub_username, broker.hub_password).publish(own, b"control")
    assert a.next_message() == (own, b"control")
    assert {topic for topic, _ in a.drain()} <= {own}  # overlapping filters may repeat the control, nothing else


def test_anonymous_and_wrong_passwords_are_refused(
    broker: ManagedBroker, connect: Callable[..., Peer], new_device: Callable
) -> None:
    device_id, _ = new_device()
    for username, password in [
        (None, None),
        (broker.hub_username, "wrong"),
        (device_id, "wrong"),
        ("never-added", "whatever"),
    ]:
        peer = connect(username, password)
        assert peer.connack.is_failure, (username, peer.connack)


def test_remove_user_refuses_later_connects(broker: ManagedBroker, connect: Callable[..., Peer]) -> None:
    device_id, password = "dev-removed", "tdc_secret"
    broker.add_user(device_id, password)
    online = connect(device_id, password)
    assert not online.connack.is_failure
    assert broker.remove_user(device_id) is True
    assert connect(device_id, password).connack.is_failure
    # Mosquitto re-checks connected clients on reload, so the open session is closed as well.
    deadline = time.monotonic() + WAIT_S
    while online.client.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not online.client.is_connected()
    assert broker.remove_user(device_id) is False
    assert device_id not in broker.usernames()


def test_passwords_never_written_in_clear(broker: ManagedBroker, new_device: Callable) -> None:
    _, password = new_device()
    for path in broker.config.data_dir.iterdir():
        text = path.read_text(errors="replace")
        assert broker.hub_password not in text and password not in text, path.name


@needs_mosquitto
def test_stop_leaves_no_process_and_is_idempotent(tmp_path: Path) -> None:
    with ManagedBroker(BrokerConfig(tmp_path)) as b:
        pid, port = b.pid, b.port
        assert pid is not None and b.running
    assert not b.running and b.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    with pytest.raises(OSError):
        socket.create_connection((b.host, port), timeout=1).close()
    b.stop()  # second stop is a no-op


@needs_mosquitto
def test_restart_keeps_devices_port_and_hub_password(tmp_path: Path) -> None:
    broker = ManagedBroker(BrokerConfig(tmp_path))
    broker.add_user("dev-early", "tdc_early")  # before the first start: picked up by start()
    with broker:
        first, port = broker.hub_password, broker.port
    with broker:
        assert (broker.hub_password, broker.port) == (first, port), "connected clients can reconnect"
        with pytest.raises(BrokerError, match="not been started"):
            _ = ManagedBroker(BrokerConfig(tmp_path)).hub_password  # a new instance draws its own at start
        assert broker.usernames() == ["dev-early"]
        peer = Peer(broker, "dev-early", "tdc_early")
        peer.close()
        assert not peer.connack.is_failure


@needs_mosquitto
def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = ManagedBroker(BrokerConfig(tmp_path, port=taken.getsockname()[1]))
        try:
            # A plain TCP probe would reach `taken` and call this a success; start() must not.
            with pytest.raises(BrokerError, match=r"(?s)exited with status.*Address already in use"):
                broker.start()
        finally:
            broker.stop()
    assert not broker.running


@pytest.mark.parametrize("username", ["", "a/b", "a+b", "#", "a b", "dev\n", "dev:1", "../x", "é", "x" * 129])
def test_invalid_usernames_are_rejected(tmp_path: Path, username: str) -> None:
    broker = ManagedBroker(BrokerConfig(tmp_path / "b"))
    with pytest.raises(ValueError, match="invalid MQTT username"):
        broker.add_user(username, "pw")
    with pytest.raises(ValueError, match="invalid MQTT username"):
        broker.remove_user(username)
    assert not (tmp_path / "b").exists()  # rejected before anything was written


def test_hub_account_and_empty_password_are_rejected(tmp_path: Path) -> None:
    broker = ManagedBroker(BrokerConfig(tmp_path))
    with pytest.raises(ValueError, match="hub's own account"):
        broker.add_user(HUB_USERNAME, "pw")
    with pytest.raises(ValueError, match="empty"):
        broker.add_user("dev-1", "")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not found")
def test_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "dev-1", "s3cret"], check=True, timeout=10)
    entry = path.read_text().strip().partition(":")[2]
    m = re.fullmatch(r"\$7\$101\$([^$]+)\$[^$]+", entry)
    assert m, entry
    assert hash_password("s3cret", salt=base64.b64decode(m.group(1))) == entry


def _mosquitto_uid() -> int | None:
    try:
        return pwd.getpwnam("mosquitto").pw_uid
    except KeyError:
        return None


@needs_mosquitto
@pytest.mark.skipif(os.geteuid() != 0 or _mosquitto_uid() is None, reason="needs root and a 'mosquitto' account")
def test_root_drops_to_data_dir_owner() -> None:
    # Outside tmp_path on purpose: pytest's root directory is 0700, which the mosquitto account cannot
    # search (start() would fail with a hint saying so).
    data_dir = Path(tempfile.mkdtemp(prefix="tandem-broker-"))
    try:
        account = pwd.getpwnam("mosquitto")
        os.chown(data_dir, account.pw_uid, account.pw_gid)
        with ManagedBroker(BrokerConfig(data_dir)) as broker:
            status = Path(f"/proc/{broker.pid}/status").read_text()
            assert re.search(rf"^Uid:\s+{account.pw_uid}\s", status, re.M), status
            broker.add_user("dev-dropped", "tdc_x")  # the reload re-reads the files as 'mosquitto'
            peer = Peer(broker, "dev-dropped", "tdc_x")
            peer.close()
            assert not peer.connack.is_failure
    finally:
        shutil.rmtree(data_dir)
