"""The managed broker's lifetime: a stable port across instances, death with the process that started
it (SIGKILL included), a stale broker of the same data_dir ended at start, and devices held back
until the hub admits them. Against the real Mosquitto binary."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud_hub.broker import BrokerConfig, BrokerError, ManagedBroker, find_mosquitto

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not found")


def alive(pid: int) -> bool:
    """Running (a zombie, left for a reaper that is not us, counts as ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def wait_until(predicate, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def connack(broker: ManagedBroker, username: str, password: str) -> mqtt.ReasonCode:
    """The CONNACK a fresh MQTT v5 client gets."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    got: list[mqtt.ReasonCode] = []
    client.on_connect = lambda c, u, flags, rc, props: got.append(rc)
    client.connect(broker.host, broker.port)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        client.loop(0.05)
    client.disconnect()
    assert got, "no CONNACK"
    return got[0]


def test_new_instance_reuses_the_saved_port_when_free(tmp_path: Path) -> None:
    with ManagedBroker(BrokerConfig(tmp_path)) as first:
        port = first.port
    with ManagedBroker(BrokerConfig(tmp_path)) as second:
        assert second.port == port, "agents that saved the address reach the next hub's broker"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with ManagedBroker(BrokerConfig(tmp_path)) as third:
            assert third.port != port  # taken by someone else: a free one, saved for next time
            moved = third.port
    with ManagedBroker(BrokerConfig(tmp_path)) as fourth:
        assert fourth.port == moved


# Started from a thread that ends at once, as asyncio.to_thread's would: the broker must outlive that
# thread and die with the process.
_CHILD = """
import sys, threading, time
from pathlib import Path
from cloud_hub.broker import BrokerConfig, ManagedBroker
broker = ManagedBroker(BrokerConfig(Path(sys.argv[1])))
t = threading.Thread(target=broker.start)
t.start()
t.join()
print(broker.pid, flush=True)
time.sleep(60)
"""


def test_broker_outlives_the_starting_thread_and_dies_with_the_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env) as hub:
        try:
            pid = int(hub.stdout.readline())
            time.sleep(0.5)
            assert alive(pid), "the starting thread ended: the broker must not end with it"
            os.kill(hub.pid, signal.SIGKILL)  # no chance to stop the broker
            took = wait_until(lambda: not alive(pid), timeout=3)
            print(f"broker ended {took * 1000:.0f} ms after its hub was SIGKILLed")
        finally:
            hub.kill()


def test_stale_broker_of_the_same_data_dir_is_ended_at_start(tmp_path: Path) -> None:
    broker = ManagedBroker(BrokerConfig(tmp_path))
    with broker:
        port = broker.port
    # A broker that a killed hub left behind: its own process (not our child), named by the pidfile.
    conf = tmp_path / "mosquitto.conf"
    stale = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        broker.pid_path.write_text(f"{stale.pid}\n")
        wait_until(lambda: accepts(port), 5)
        with ManagedBroker(BrokerConfig(tmp_path)) as fresh:
            assert stale.wait(5) is not None, "the stale broker was ended"
            assert fresh.port == port, "and its port taken over"
            assert fresh.pid_path.read_text().strip() == str(fresh.pid)
        assert not fresh.pid_path.exists()
    finally:
        stale.kill()
        stale.wait()


def test_pidfile_naming_another_process_is_left_alone(tmp_path: Path) -> None:
    other_dir = tmp_path / "other"
    with ManagedBroker(BrokerConfig(other_dir)) as other:  # a mosquitto, but of another data_dir
        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            for pid in (sleeper.pid, other.pid, os.getpid()):
                broker = ManagedBroker(BrokerConfig(tmp_path / "mine"))
                broker.pid_path.parent.mkdir(parents=True, exist_ok=True)
                broker.pid_path.write_text(f"{pid}\n")
                with broker:
                    pass
                assert sleeper.poll() is None and other.running
        finally:
            sleeper.kill()
            sleeper.wait()


def test_held_devices_connect_only_once_admitted(tmp_path: Path) -> None:
    broker = ManagedBroker(BrokerConfig(tmp_path))
    broker.add_user("dev-held", "tdc_held")
    broker.start(hold_devices=True)
    try:
        assert not connack(broker, broker.hub_username, broker.hub_password).is_failure
        assert connack(broker, "dev-held", "tdc_held").is_failure
        broker.add_user("dev-late", "tdc_late")  # enrolled while held: held too, and kept
        assert connack(broker, "dev-late", "tdc_late").is_failure
        broker.admit_devices()
        assert not connack(broker, "dev-held", "tdc_held").is_failure
        assert not connack(broker, "dev-late", "tdc_late").is_failure
        assert broker.usernames() == ["dev-held", "dev-late"]
    finally:
        broker.stop()


def test_a_broker_that_crashes_while_starting_is_started_once_more(tmp_path: Path, monkeypatch) -> None:
    """mosquitto 2.0.11 sometimes dies of SIGSEGV while starting on a port it just left: start() tries a
    second time. A mosquitto that crashes every time is still an error, naming the signal."""
    real = find_mosquitto()
    assert real is not None
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    crashes = tmp_path / "crashes-left"
    wrapper = wrapper_dir / "mosquitto"
    # Crashes (SIGSEGV, as 2.0.11 does) while crashes-left holds a positive count; then the real broker.
    wrapper.write_text(
        f'#!/bin/sh\nn=$(cat {crashes})\nif [ "$n" -gt 0 ]; then echo $((n - 1)) > {crashes}; kill -SEGV $$; fi\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    crashes.write_text("1")
    broker = ManagedBroker(BrokerConfig(tmp_path / "once"))
    broker.start()
    try:
        assert crashes.read_text().strip() == "0" and broker.running  # crashed once, then came up
    finally:
        broker.stop()
    crashes.write_text("2")
    with pytest.raises(BrokerError, match="status -11"):
        ManagedBroker(BrokerConfig(tmp_path / "always")).start()
