"""Transport security for devices on other machines: mutual TLS on the hub's device port, the broker's
TLS listener with per-device ACLs, and its plaintext listener on loopback only. Real hubs, agents,
Mosquitto and, for "another machine", a network namespace."""

from __future__ import annotations

import asyncio
import stat
import threading
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_hub.broker import BrokerConfig, BrokerTls
from cloud_hub.broker_process import free_port
from cloud_hub.errors import InvalidRequest
from cloud_hub.pki import init_pki, load_device_ca, sign_device_csr
from cloud_hub.server import Hub
from edge_agent.agent import Agent, AgentConfig
from edge_agent.credentials import Credentials, EnrollmentRejected, load_credentials, save_credentials
from edge_agent.identity import DeviceIdentity, new_key_request, save_identity
from models.runtime import load
from models.sampling import SamplingParams
from models.serving import ServedModel
from tandem import AsyncClient
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tandem_cli import hub as hub_cli
from tandem_cli.main import build_parser
from tests.hubkit import needs_mosquitto, running_hub, tiny_llama, wait_for
from tests.netns import veth_namespace

pytestmark = needs_mosquitto
CHAT = [{"role": "user", "content": "the cat sat in a hat"}]


def enroll_device(hub: Hub, state_dir: Path, name: str) -> tuple[pb.EnrollResponse, DeviceIdentity]:
    """Enroll through the hub's registry as an agent would (its own key, a CSR); save what it gets."""
    assert hub.registry is not None
    key, csr = new_key_request(name)
    resp = hub.registry.enroll(hub.registry.create_token(), name, "cpu-2core", [], False, csr)
    return resp, save_identity(state_dir, key, resp.certificate, resp.ca_certificate)


async def connect_status(address: str, creds: grpc.ChannelCredentials, device_id: str, credential: str):
    """How the hub answers a work channel opened with these TLS credentials and this device login:
    (status code, details); OK when it sent its Welcome and then its first Ping (the channel was
    accepted: a refusal on the main port comes after one Welcome, cloud_hub.servicers)."""
    metadata = (("x-tandem-device-id", device_id), ("x-tandem-credential", credential))
    hello = pb.AgentMessage(hello=pb.Hello(max_concurrency=1))
    async with grpc.aio.secure_channel(address, creds) as channel:
        call = pb_grpc.WorkChannelStub(channel).Connect(iter([hello]), metadata=metadata, timeout=10)
        try:
            first, second = await call.read(), await call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        call.cancel()
        assert second is not grpc.aio.EOF and second.WhichOneof("kind") == "ping"
        return grpc.StatusCode.OK, first.WhichOneof("kind")


async def welcome_then_status(address: str, creds: grpc.ChannelCredentials, device_id: str, credential: str):
    """(the messages, the status code) of a work channel read to its end: what the main port answers."""
    metadata = (("x-tandem-device-id", device_id), ("x-tandem-credential", credential))
    hello = pb.AgentMessage(hello=pb.Hello(max_concurrency=1))
    async with grpc.aio.secure_channel(address, creds) as channel:
        call = pb_grpc.WorkChannelStub(channel).Connect(iter([hello]), metadata=metadata, timeout=10)
        messages = []
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            while (msg := await call.read()) is not grpc.aio.EOF:
                messages.append(msg)
        return messages, refused.value.code()


async def test_enroll_without_a_csr_is_refused_and_the_token_stays_unspent(tmp_path: Path) -> None:
    tls = tmp_path / "hub" / "tls"
    init_pki(tls, ["127.0.0.1"])
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none", tls_dir=tls) as hub:
        assert hub.registry is not None and hub.device_port > 0
        token = hub.registry.create_token()
        for csr, match in ((b"", "requires mutual TLS"), (b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n", "csr:")):
            with pytest.raises(InvalidRequest, match=match):
                hub.registry.enroll(token, "d", "cpu-2core", [], False, csr)
        key, csr = new_key_request("d")
        resp = hub.registry.enroll(token, "d", "cpu-2core", [], False, csr)  # the same token still works
        cert = x509.load_pem_x509_certificate(resp.certificate)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == resp.device_id
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert cert.public_key() == key.public_key()
        assert 700 < (cert.not_valid_after_utc - cert.not_valid_before_utc).days < 740
        assert resp.ca_certificate == (tls / "ca.pem").read_bytes()


async def test_mtls_agent_serves_and_devices_without_their_certificate_are_refused(tmp_path: Path) -> None:
    tls = tmp_path / "hub" / "tls"
    paths = init_pki(tls, ["127.0.0.1"])
    other = init_pki(tmp_path / "other", ["127.0.0.1"])  # another deployment's CA
    model = tiny_llama(tmp_path)
    state = tmp_path / "agent"
    async with running_hub(tmp_path / "hub", cloud_model=None, tls_dir=tls) as hub:
        assert hub.broker is not None and hub.registry is not None
        token = hub.registry.create_token()
        config = AgentConfig(hub=hub.address, profile="cpu-2core", state_dir=state, name="mtls", token=token,
                             tls_ca=paths["ca.pem"], telemetry_interval_s=0.2)  # fmt: skip
        agent, stop = Agent(config, ServedModel("tiny", load(model, use_cache=False))), asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await wait_for(lambda: len(hub.fleet.online()) == 1, timeout=20)
        creds = agent.creds
        assert creds is not None and creds.mqtt is not None
        device = creds.device_id
        # Its key stayed here (0600); it dials the device port, and the broker's TLS listener.
        assert stat.S_IMODE((state / "device.key").stat().st_mode) == 0o600
        assert creds.device_hub == f"127.0.0.1:{hub.device_port}" and hub.device_port != hub.port
        assert (creds.mqtt.port, creds.mqtt.ca_file != "") == (hub.broker.tls_port, True)
        await wait_for(lambda: hub.fleet.mqtt_status.get(device) == "online", timeout=10)  # telemetry over TLS

        key = hub.registry.create_api_key("t")
        local = load(model, use_cache=False).generator().generate([CHAT], SamplingParams(max_tokens=8))[0]
        async with AsyncClient(hub.address, api_key=key, timeout=20, tls_ca=str(paths["ca.pem"])) as client:
            result = await client.generate(CHAT, model="tiny", max_tokens=8)
            assert result.token_ids == local.token_ids and result.text == local.text
            assert result.placement is not None and result.placement.device_id == device

            ca = paths["ca.pem"].read_bytes()
            server_only = grpc.ssl_channel_credentials(ca)
            device_addr = f"127.0.0.1:{hub.device_port}"
            # The right credential without the certificate: refused on the main port, saying what to do,
            # after one Welcome that names the device port (how an agent finds a port that moved) ...
            code, details = await connect_status(hub.address, server_only, device, creds.credential)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "re-enroll" in details
            messages, code = await welcome_then_status(hub.address, server_only, device, creds.credential)
            assert [m.welcome.device_port for m in messages] == [hub.device_port]
            assert code == grpc.StatusCode.UNAUTHENTICATED
            # ... and a wrong credential gets no Welcome at all.
            messages, code = await welcome_then_status(hub.address, server_only, device, "wrong")
            assert (messages, code) == ([], grpc.StatusCode.UNAUTHENTICATED)
            # ... and the device port does not even finish the handshake.
            code, _ = await connect_status(device_addr, server_only, device, creds.credential)
            assert code == grpc.StatusCode.UNAVAILABLE
            # A certificate for this device id, but from another deployment's CA: no handshake either.
            foreign_key, csr = new_key_request("x")
            other_ca = load_device_ca(other["ca.pem"].parent)
            assert other_ca is not None
            foreign = save_identity(tmp_path / "foreign", foreign_key, sign_device_csr(other_ca, csr, device), ca)
            code, _ = await connect_status(device_addr, foreign.channel_credentials(), device, creds.credential)
            assert code == grpc.StatusCode.UNAVAILABLE
            # Our CA's certificate, but another device's: refused by name.
            _, neighbour = enroll_device(hub, tmp_path / "neighbour", "neighbour")
            code, details = await connect_status(device_addr, neighbour.channel_credentials(), device, creds.credential)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "not" in details

            # The hub, and the real agent's session, are untouched.
            assert [s.device_id for s in hub.fleet.online()] == [device]
            again = await client.generate(CHAT, model="tiny", max_tokens=8)
            assert again.token_ids == local.token_ids
        stop.set()
        await asyncio.wait_for(task, 10)

        # An agent enrolled before the hub required certificates (no device_hub, no key): told to re-enroll.
        old = tmp_path / "old-agent"
        save_credentials(old, Credentials(device, creds.credential, hub.address, None))
        assert load_credentials(old) is not None
        config = AgentConfig(hub=hub.address, profile="cpu-2core", state_dir=old, name="old", tls_ca=paths["ca.pem"])
        stale = Agent(config, ServedModel("tiny", load(model, use_cache=False)))
        with pytest.raises(EnrollmentRejected, match="re-enroll"):
            await asyncio.wait_for(stale.run(asyncio.Event()), 20)


async def test_an_enrolled_agent_follows_the_device_port_to_a_new_one(tmp_path: Path) -> None:
    """The hub restarts with another device port (`tandem hub up --device-listen`): the agent, whose
    saved port now refuses it, reads the new one from the main port's Welcome, saves it, and serves."""
    paths = init_pki(tmp_path / "hub" / "tls", ["127.0.0.1"])
    model = tiny_llama(tmp_path)
    state = tmp_path / "agent"
    hub_cfg = {"cloud_model": None, "mqtt": "none", "tls_dir": paths["ca.pem"].parent}
    async with running_hub(tmp_path / "hub", **hub_cfg) as hub:
        assert hub.registry is not None
        address, old_port = hub.address, hub.device_port
        config = AgentConfig(hub=address, profile="cpu-2core", state_dir=state, name="mover", backoff_max_s=0.5,
                             token=hub.registry.create_token(), tls_ca=paths["ca.pem"])  # fmt: skip
        agent, stop = Agent(config, ServedModel("tiny", load(model, use_cache=False))), asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await wait_for(lambda: len(hub.fleet.online()) == 1, timeout=20)
        assert agent.creds is not None and agent.creds.device_hub == f"127.0.0.1:{old_port}"
    new_port = free_port("127.0.0.1")
    assert new_port != old_port
    device_listen = f"127.0.0.1:{new_port}"
    async with running_hub(tmp_path / "hub", listen=address, device_listen=device_listen, **hub_cfg) as hub:
        assert hub.device_port == new_port
        await wait_for(lambda: len(hub.fleet.online()) == 1, timeout=20)
        saved = load_credentials(state)
        assert saved is not None and saved.device_hub == agent.creds.device_hub == device_listen
        assert hub.registry is not None
        key = hub.registry.create_api_key("t")
        local = load(model, use_cache=False).generator().generate([CHAT], SamplingParams(max_tokens=8))[0]
        async with AsyncClient(hub.address, api_key=key, timeout=20, tls_ca=str(paths["ca.pem"])) as client:
            result = await client.generate(CHAT, model="tiny", max_tokens=8)
        assert result.token_ids == local.token_ids
        stop.set()
        await asyncio.wait_for(task, 10)


def test_hub_up_takes_the_device_port(tmp_path: Path) -> None:
    args = build_parser().parse_args(["hub", "up", "--data-dir", str(tmp_path), "--device-listen", "0.0.0.0:50052"])
    assert hub_cli._hub_config(args).device_listen == "0.0.0.0:50052"
    assert hub_cli._hub_config(build_parser().parse_args(["hub", "up"])).device_listen is None


def test_a_broker_with_tls_keeps_its_plaintext_listener_on_loopback(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "tls", ["127.0.0.1"])
    tls = BrokerTls(paths["ca.pem"], paths["hub.pem"], paths["hub.key"])
    with pytest.raises(ValueError, match="must bind loopback"):
        BrokerConfig(tmp_path / "mqtt", host="0.0.0.0", tls=tls)
    assert BrokerConfig(tmp_path / "mqtt", host="::1", tls=tls).tls == tls
    assert BrokerConfig(tmp_path / "mqtt", host="0.0.0.0").tls is None  # plaintext only: as before


class Subscriber:
    """A paho client that records (topic, payload) of every message it receives, from its own thread."""

    def __init__(self, host: str, port: int, user: str, password: str, tls: DeviceIdentity | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.granted: list[bool] = []
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, password)
        if tls is not None:
            self.client.tls_set(str(tls.ca_file), str(tls.cert_file), str(tls.key_file))
        self.client.on_connect = lambda c, u, f, rc, p: rc.is_failure or self.connected.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.granted.extend(not r.is_failure for r in codes)
        self.client.connect(host, port, 5)
        self.client.loop_start()

    def topics(self) -> list[str]:
        return [t for t, _ in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_a_device_cannot_publish_or_subscribe_under_another_devices_topic(tmp_path: Path) -> None:
    tls = tmp_path / "hub" / "tls"
    init_pki(tls, ["127.0.0.1"])
    async with running_hub(tmp_path / "hub", cloud_model=None, tls_dir=tls) as hub:
        broker = hub.broker
        assert broker is not None and broker.tls_port > 0
        a, a_tls = enroll_device(hub, tmp_path / "a", "a")
        b, b_tls = enroll_device(hub, tmp_path / "b", "b")
        assert a.mqtt.tls_port == broker.tls_port
        # The hub's side: its own account, on the loopback plaintext listener.
        watcher = Subscriber(broker.host, broker.port, broker.hub_username, broker.hub_password)
        dev_a = Subscriber("127.0.0.1", broker.tls_port, a.mqtt.username, a.mqtt.password, a_tls)
        dev_b = Subscriber("127.0.0.1", broker.tls_port, b.mqtt.username, b.mqtt.password, b_tls)
        try:
            await wait_for(lambda: watcher.connected.is_set() and dev_a.connected.is_set() and dev_b.connected.is_set())
            watcher.client.subscribe("tandem/v1/devices/#", qos=1)
            # Another device's topics: Mosquitto 2.0 grants the subscription and checks read access
            # on each message it would deliver (below: nothing of B's reaches A).
            dev_a.client.subscribe(f"tandem/v1/devices/{b.device_id}/#", qos=1)
            await wait_for(lambda: len(watcher.granted) == 1 and len(dev_a.granted) == 1)
            assert watcher.granted == [True]

            # A impersonates B, then speaks for itself, on one connection: the broker keeps its order,
            # so once A's own message is in, an impostor message that got through would be in too.
            dev_a.client.publish(f"tandem/v1/devices/{b.device_id}/status", "offline", qos=1).wait_for_publish(3)
            dev_a.client.publish(f"tandem/v1/devices/{a.device_id}/status", "online", qos=1).wait_for_publish(3)
            await wait_for(lambda: f"tandem/v1/devices/{a.device_id}/status" in watcher.topics())
            assert not any(b.device_id in t for t in watcher.topics())
            await wait_for(lambda: hub.fleet.mqtt_status.get(a.device_id) == "online")  # the hub's ingest too
            assert hub.fleet.mqtt_status.get(b.device_id) is None

            # B's own messages reach the hub, and never A, whose subscription was refused.
            dev_b.client.publish(f"tandem/v1/devices/{b.device_id}/status", "online", qos=1).wait_for_publish(3)
            await wait_for(lambda: f"tandem/v1/devices/{b.device_id}/status" in watcher.topics())
            await asyncio.sleep(0.2)
            assert dev_a.messages == []
        finally:
            for client in (watcher, dev_a, dev_b):
                client.close()


async def test_plaintext_broker_is_loopback_only_and_tls_reaches_it_from_another_machine(tmp_path: Path) -> None:
    with veth_namespace() as ns:
        tls = tmp_path / "hub" / "tls"
        init_pki(tls, ["127.0.0.1", ns.host_ip])
        async with running_hub(tmp_path / "hub", cloud_model=None, listen="0.0.0.0:0", tls_dir=tls) as hub:
            broker = hub.broker
            assert broker is not None
            resp, identity = enroll_device(hub, tmp_path / "dev", "remote")
            login = {"host": ns.host_ip, "user": resp.mqtt.username, "password": resp.mqtt.password}
            status = f"{resp.mqtt.topic_prefix}/status"
            # From the namespace: the plaintext listener is not there (it binds loopback) ...
            plain = await ns.mqtt_probe({**login, "port": broker.port, "topic": status, "payload": "online"})
            assert plain.get("error") == "ConnectionRefusedError", plain
            # ... the TLS one needs a client certificate from our CA ...
            files = {"ca": str(identity.ca_file), "cert": str(identity.cert_file), "key": str(identity.key_file)}
            bare = await ns.mqtt_probe({**login, "port": broker.tls_port, "ca": files["ca"]})
            assert "connack" not in bare and ("disconnected" in bare or "error" in bare), bare
            # ... and with it, and the device's own password, the device is in and the hub hears it.
            ok = await ns.mqtt_probe({**login, **files, "port": broker.tls_port, "topic": status, "payload": "online"})
            assert ok == {"connack": "Success", "published": True}, ok
            await wait_for(lambda: hub.fleet.mqtt_status.get(resp.device_id) == "online")
