"""Over-the-air updates end to end: real gRPC, real Mosquitto, tiny models of different weights.

An update is a command on the device's MQTT topic, a bundle fetched over gRPC and verified, and a
swap between requests; these tests check each promise against exact greedy tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from cloud_hub.store import DeviceRecord, PostgresStore, SQLiteStore, UpdateRecord
from edge_agent.pacing import floor_pacer
from models.bundle import bundle_version, save_bundle
from models.runtime import load
from models.sampling import SamplingParams
from models.serving import ServedModel
from tandem import AsyncClient, Budget, InvalidRequest, TandemError, Unauthenticated
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tests.hubkit import ROOT, kill, needs_mosquitto, running_hub, start_served_agent, wait_for
from tests.pg import fresh_database
from tests.tiny import TinySpec, write_tiny_gguf

CHAT = [{"role": "user", "content": "the cat sat in a hat"}]
BUDGET = Budget(ttft_ms=60_000)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny llamas of different weights (their greedy answers differ from the first token)."""
    folder = tmp_path_factory.mktemp("ota-models")
    spec = TinySpec(arch="llama", n_layers=2, context_length=256)
    old = write_tiny_gguf(folder / "old.gguf", spec)
    new = write_tiny_gguf(folder / "new.gguf", TinySpec(**{**spec.__dict__, "seed": 1}))
    return old, new


def greedy(path: Path, max_tokens: int) -> list[int]:
    """What the model at `path` answers CHAT with, loaded directly."""
    return load(path, use_cache=False).generator().generate([CHAT], SamplingParams(max_tokens=max_tokens))[0].token_ids


async def device_where(client: AsyncClient, device_id: str, predicate, timeout: float = 20.0) -> pb.Device:
    """The device's ListDevices entry once `predicate(entry)` holds."""
    found: list[pb.Device] = []

    def check() -> bool:
        return bool(found) and predicate(found[-1])

    async def poll() -> None:
        while True:
            found.append(next(d for d in await client.devices() if d.device_id == device_id))
            if predicate(found[-1]):
                return
            await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), timeout)
    assert check()
    return found[-1]


async def enroll_raw(address: str, token: str) -> tuple[str, str]:
    """(device id, credential) of a device enrolled over the wire, with no agent behind it."""
    async with grpc.aio.insecure_channel(address) as channel:
        request = pb.EnrollRequest(token=token, name="raw", profile="cpu-2core")
        resp = await pb_grpc.RegistryStub(channel).Enroll(request)
    return resp.device_id, resp.credential


# -- the update itself ---------------------------------------------------------------------------------


@needs_mosquitto
async def test_update_swaps_the_model_without_dropping_a_request(tmp_path, tmp_cache, models) -> None:
    old, new = models
    async with running_hub(tmp_path / "hub", cloud_model=None) as hub:
        key = hub.registry.create_api_key("ops")
        # Paced so that the first request is still streaming while the update lands.
        served = ServedModel("tiny", load(old, use_cache=False), pacer=floor_pacer(None, 120.0))
        ra = await start_served_agent(hub, served, tmp_path / "agent", "edge-1")
        dev = ra.device_id
        await wait_for(lambda: hub.fleet.mqtt_status.get(dev) == "online")  # subscribed to its commands
        async with AsyncClient(hub.address, api_key=key, timeout=60) as client:
            first: list = []

            async def long_request() -> list[int]:
                ids: list[int] = []
                async for chunk in client.stream(CHAT, max_tokens=60, budget=BUDGET):
                    ids += chunk.token_ids
                    first.append(chunk)
                return ids

            streaming = asyncio.create_task(long_request())
            await wait_for(lambda: bool(first), timeout=20)
            command = await client.update_device(dev, str(new), "fp32")
            assert command.startswith("cmd-")
            device = await device_where(client, dev, lambda d: d.update.startswith(f"{command} ok"))
            assert not streaming.done(), "the update landed while the first request still ran"
            version = bundle_version(Path(hub.store.get_update(command).bundle))
            await wait_for(lambda: hub.fleet.sessions[dev].models[0].version == version)
            # The request in flight finished on the old model, whole; the next one runs on the new.
            assert await streaming == greedy(old, 60)
            after = await client.generate(CHAT, max_tokens=12, budget=BUDGET)
            assert after.token_ids == greedy(new, 12)
            assert after.placement is not None and after.placement.device_id == dev
            device = await device_where(client, dev, lambda d: d.models[0].version == version)
            assert (device.models[0].name, device.models[0].quant, device.agent_version) == (str(new), "fp32", "0.1.0")
            bundle = tmp_path / "agent" / "bundles" / version
            assert bundle_version(bundle) == version
            assert sorted(p.name for p in bundle.parent.iterdir()) == [version]  # no partial fetch left
        await ra.close()


@needs_mosquitto
async def test_a_corrupt_bundle_fails_the_update_and_the_old_model_serves_on(tmp_path, tmp_cache, models) -> None:
    old, new = models
    async with running_hub(tmp_path / "hub", cloud_model=None) as hub:
        key = hub.registry.create_api_key("ops")
        served = ServedModel("tiny", load(old, use_cache=False))
        ra = await start_served_agent(hub, served, tmp_path / "agent", "edge-1")
        dev = ra.device_id
        await wait_for(lambda: hub.fleet.mqtt_status.get(dev) == "online")
        # The hub's cached bundle is damaged after it was built: one byte of its weights flipped.
        bundle = await asyncio.to_thread(hub.updates.bundles.prepare, str(new), new, "fp32")
        weights = bundle / "weights.pt"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        async with AsyncClient(hub.address, api_key=key, timeout=60) as client:
            command = await client.update_device(dev, str(new), "fp32")
            device = await device_where(client, dev, lambda d: d.update.startswith(f"{command} failed"))
            assert "weights.pt: checksum mismatch" in device.update
            result = await client.generate(CHAT, max_tokens=12, budget=BUDGET)
            assert result.token_ids == greedy(old, 12)
            assert [(m.name, m.version) for m in device.models] == [("tiny", "")]
        assert not any((tmp_path / "agent" / "bundles").iterdir()), "nothing of the failed fetch is kept"
        await ra.close()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_store_keeps_update_outcomes_once(dialect: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if dialect == "sqlite":
        opener = lambda: SQLiteStore(tmp_path / "r.db")  # noqa: E731
    else:
        url = fresh_database(request.getfixturevalue("pg_server"))
        opener = lambda: PostgresStore(url)  # noqa: E731
    store = opener()
    store.add_device(DeviceRecord("dev-a", "a", "cpu-2core", "h", ({"name": "tiny"},)))
    store.add_update(UpdateRecord("cmd-1", "dev-a", "m1", "int8", "v1", "/b1", created=1.0))
    store.add_update(UpdateRecord("cmd-2", "dev-a", "m2", "int4", "v2", "/b2", created=2.0))
    assert not store.finish_update("cmd-2", "dev-b", "ok", "x")  # another device's result is not taken
    assert store.finish_update("cmd-2", "dev-a", "failed", "checksum mismatch")
    assert not store.finish_update("cmd-2", "dev-a", "ok", "late")  # the first outcome stands
    store.set_agent_version("dev-a", "0.1.0")
    store.set_agent_version("dev-a", "0.2.0")
    store.set_models("dev-a", ({"name": "m2", "version": "v2"},))
    store.close()
    store = opener()  # what a restarted hub reads
    assert store.latest_updates()["dev-a"].summary() == "cmd-2 failed: checksum mismatch"
    assert store.get_update("cmd-1").status == "pending"
    assert store.agent_versions() == {"dev-a": "0.2.0"}
    assert store.get_device("dev-a").models == ({"name": "m2", "version": "v2"},)
    assert store.remove_device("dev-a") and store.latest_updates() == {} and store.agent_versions() == {}
    store.close()


# -- refusals ------------------------------------------------------------------------------------------


@needs_mosquitto
async def test_bad_updates_are_refused_clearly(tmp_path, tmp_cache, models) -> None:
    old, new = models
    async with running_hub(tmp_path / "hub", cloud_model=None) as hub:
        key = hub.registry.create_api_key("ops")
        dev_a, _ = await enroll_raw(hub.address, hub.registry.create_token())
        dev_b, cred_b = await enroll_raw(hub.address, hub.registry.create_token())
        async with AsyncClient(hub.address, api_key=key, timeout=60) as client:
            with pytest.raises(InvalidRequest, match="device 'dev-nope' is not registered") as exc:
                await client.update_device("dev-nope", str(new), "fp32")
            assert exc.value.code == "NOT_FOUND"
            with pytest.raises(InvalidRequest, match="model: unknown model 'no-such-model'") as exc:
                await client.update_device(dev_a, "no-such-model", "fp32")
            assert exc.value.code == "NOT_FOUND"
            with pytest.raises(InvalidRequest, match="quant: 'int3'") as exc:
                await client.update_device(dev_a, str(new), "int3")
            assert exc.value.code == "INVALID_ARGUMENT"
            for quant in ("fp32", "source", ""):  # "": the profile's, "source" for cpu-2core: all have bundles
                with pytest.raises(TandemError, match="is offline") as exc:  # enrolled, never connected
                    await client.update_device(dev_a, str(new), quant)
                assert exc.value.code == "FAILED_PRECONDITION"
        async with AsyncClient(hub.address, timeout=10) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.update_device(dev_a, str(new), "fp32")
        # A command for A (recorded as the hub records one), fetched by B: refused.
        served = ServedModel("tiny", load(old, use_cache=False))
        ra = await start_served_agent(hub, served, tmp_path / "agent", "edge-a")
        await wait_for(lambda: hub.fleet.mqtt_status.get(ra.device_id) == "online")
        async with AsyncClient(hub.address, api_key=key, timeout=60) as client:
            command = await client.update_device(ra.device_id, str(new), "")  # the profile's: a source bundle
        record = hub.store.get_update(command)
        assert record is not None and record.quant == "source"
        assert json.loads((Path(record.bundle) / "manifest.json").read_text())["quant"]["label"].startswith("source(")
        async with grpc.aio.insecure_channel(hub.address) as channel:
            stub = pb_grpc.RegistryStub(channel)

            async def fetch(command_id: str, device: str, credential: str) -> grpc.aio.AioRpcError:
                md = (("x-tandem-device-id", device), ("x-tandem-credential", credential))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.FetchBundle(pb.FetchBundleRequest(command_id=command_id), metadata=md):
                        pass
                return err.value

            err = await fetch(command, dev_b, cred_b)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "another device" in err.details()
            err = await fetch("cmd-unknown", dev_b, cred_b)
            assert err.code() == grpc.StatusCode.NOT_FOUND
            err = await fetch(command, dev_b, "wrong")
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        await ra.close()


async def test_a_hub_without_a_broker_refuses_updates(tmp_path, models) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        key = hub.registry.create_api_key("ops")
        dev, _ = await enroll_raw(hub.address, hub.registry.create_token())
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            with pytest.raises(TandemError, match="without a broker") as exc:
                await client.update_device(dev, str(models[1]), "fp32")
        assert exc.value.code == "FAILED_PRECONDITION"


async def test_create_token_needs_an_api_key_and_enrolls_once(tmp_path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        key = hub.registry.create_api_key("ops")
        async with AsyncClient(hub.address, timeout=10) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.create_enrollment_token()
        async with AsyncClient(hub.address, api_key="tdk_wrong", timeout=10) as wrong:
            with pytest.raises(Unauthenticated):
                await wrong.create_enrollment_token()
        async with AsyncClient(hub.address, api_key=key, timeout=10) as client:
            issued = await client.create_enrollment_token(ttl_s=60)
            with pytest.raises(InvalidRequest, match="lifetime must be positive"):
                await client.create_enrollment_token(ttl_s=-1)
        assert 55 < issued.expires_unix - time.time() <= 60
        dev, _ = await enroll_raw(hub.address, issued.token)
        assert hub.store.get_device(dev) is not None
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await enroll_raw(hub.address, issued.token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "used" in err.value.details()


# -- the agent's command line: --config, --bundle, systemd notify ---------------------------------------


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tandem_cli", "agent", "run", *args]


def test_a_config_file_with_an_unknown_key_is_refused(tmp_path) -> None:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"hub": "127.0.0.1:1", "profile": "cpu-2core", "modle": "tiny"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(agent_command("--config", str(config)), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"error: {config}: unknown key 'modle'" in done.stderr and "model" in done.stderr


def notifications(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock`."""
    out = []
    while True:
        try:
            out.append(sock.recv(256).decode())
        except BlockingIOError:
            return out


@needs_mosquitto
async def test_agent_serves_a_bundle_from_its_config_and_takes_an_update(tmp_path, tmp_cache, models) -> None:
    old, new = models
    bundle = save_bundle(load(old, quant="int8", use_cache=False, prepare=False), tmp_path / "b-int8", "old")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # stands in for systemd's notify socket
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    async with running_hub(tmp_path / "hub", cloud_model=None) as hub:
        key = hub.registry.create_api_key("ops")
        config = tmp_path / "agent.json"
        settings = {"hub": hub.address, "profile": "cpu-2core", "bundle": "b-int8", "model": "old-int8",
                    "state_dir": "state", "agent_version": "image-7"}  # fmt: skip
        config.write_text(json.dumps(settings))  # relative paths: beside the file
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(tmp_path / "notify"),
               "WATCHDOG_USEC": "300000"}  # fmt: skip
        cmd = agent_command("--config", str(config), "--token", hub.registry.create_token(), "--name", "flashed")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            await wait_for(lambda: any(s.record.name == "flashed" for s in hub.fleet.online()), timeout=60)
            dev = next(s.device_id for s in hub.fleet.online())
            await wait_for(lambda: hub.fleet.mqtt_status.get(dev) == "online")
            async with AsyncClient(hub.address, api_key=key, timeout=60) as client:
                result = await client.generate(CHAT, max_tokens=12, budget=BUDGET)
                (device,) = await client.devices()
            # Exactly what the bundle gives loaded directly, under the configured name and version.
            local = load(bundle).generator().generate([CHAT], SamplingParams(max_tokens=12))[0]
            assert result.token_ids == local.token_ids
            info = device.models[0]
            assert (info.name, info.quant, info.version) == ("old-int8", "int8", bundle_version(bundle))
            assert device.agent_version == "image-7"
            sent = notifications(sock)
            # The watchdog pings every half of WATCHDOG_USEC: a second one is at most that far off.
            await wait_for(lambda: sent.extend(notifications(sock)) or sent.count("WATCHDOG=1") >= 2, timeout=5)
            assert sent.count("READY=1") == 1 and sent.count("WATCHDOG=1") >= 2
            # `tandem devices update --wait` through the runner's own loader (calibrated, as at start-up).
            update = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tandem_cli", "devices", "update", dev, "--model", str(new), "--quant", "int4",
                "--hub", hub.address, "--api-key", key, "--wait", "60", env=env, stdout=subprocess.PIPE,
            )  # fmt: skip
            out, _ = await update.communicate()
            assert update.returncode == 0, out
            command, outcome = out.decode().splitlines()
            assert outcome.startswith(f"{command} ok: serving {new} (int4")
            async with AsyncClient(hub.address, api_key=key, timeout=60) as client:
                result = await client.generate(CHAT, max_tokens=12, budget=BUDGET)
            local = load(new, quant="int4", use_cache=False).generator().generate([CHAT], SamplingParams(max_tokens=12))
            assert result.token_ids == local[0].token_ids
            served = json.loads((tmp_path / "state" / "served.json").read_text())
            assert served["model"] == str(new)  # a restart serves the update, not the file's bundle
        finally:
            kill(proc)
            sock.close()
