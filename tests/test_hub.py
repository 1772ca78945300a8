"""The hub, agents and SDK end to end: real gRPC over loopback, real Mosquitto, tiny models."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
import pytest

from models.runtime import load
from models.sampling import SamplingParams
from tandem import AsyncClient, Budget, BudgetUnsatisfiable, InvalidRequest, Unauthenticated, Unavailable
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tests.hubkit import kill, needs_mosquitto, running_hub, spawn_agent, start_agent, tiny_llama, wait_for

pytestmark = needs_mosquitto
CHAT = [{"role": "user", "content": "the cat sat in a hat"}]


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return tiny_llama(tmp_path)


async def test_agent_enrolls_appears_online_and_serves(tmp_path: Path, tiny_model: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=None) as hub:
        key = hub.registry.create_api_key("test")
        ra = await start_agent(hub, tiny_model, tmp_path / "agent", "edge-1")
        creds = tmp_path / "agent" / "credentials.json"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            devices = await client.devices()
            assert [(d.device_id, d.status, d.profile, d.models[0].name) for d in devices] == [
                (ra.device_id, "online", "cpu-2core", "tiny")
            ]
            result = await client.generate(CHAT, model="tiny", max_tokens=12, budget=Budget(ttft_ms=60_000))
        # Same weights, greedy: the hub's answer is exactly what the model gives locally.
        local = load(tiny_model, use_cache=False).generator().generate([CHAT], SamplingParams(max_tokens=12))[0]
        assert result.text == local.text and result.token_ids == local.token_ids
        assert result.placement is not None
        assert (result.placement.kind, result.placement.device_id) == ("edge", ra.device_id)
        assert result.completion_tokens == len(local.token_ids) and result.ttft_ms > 0 and result.energy_j > 0
        # The timing breakdown adds up: the hub's routing and the engine's own TTFT fit inside the TTFT.
        assert 0 < result.hub_route_ms < result.ttft_ms and 0 < result.engine_ttft_ms < result.ttft_ms
        assert result.hub_route_ms + result.engine_ttft_ms < result.ttft_ms
        assert 0 < result.hub_relay_ms < 1000 * len(local.token_ids)
        await ra.close()


async def test_stream_chunks_add_up_to_the_answer(tmp_path: Path, tiny_model: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=str(tiny_model), mqtt="none") as hub:
        key = hub.registry.create_api_key("test")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            whole = await client.generate("the cat", max_tokens=10)
            from tandem.types import GenerateResult

            collected = GenerateResult()
            chunks = [c async for c in client.stream("the cat", max_tokens=10, result=collected)]
        assert "".join(c.text for c in chunks) == whole.text == collected.text
        assert whole.placement is not None and whole.placement.kind == "cloud"
        assert collected.finish_reason == whole.finish_reason


async def test_killed_agent_goes_offline_and_requests_go_elsewhere(tmp_path: Path, tiny_model: Path) -> None:
    model = str(tiny_model)
    async with running_hub(tmp_path / "hub", cloud_model=model) as hub:
        key = hub.registry.create_api_key("test")
        proc = spawn_agent(hub, model, tmp_path / "agent", "victim")
        try:
            await wait_for(lambda: any(s.record.name == "victim" for s in hub.fleet.online()), timeout=60)
            device = next(s.device_id for s in hub.fleet.online())
            await wait_for(lambda: hub.fleet.mqtt_status.get(device) == "online", timeout=10)
            async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
                before = await client.generate("the cat", model=model, max_tokens=4)
                assert before.placement is not None and before.placement.device_id == device
                kill(proc)
                # The MQTT last will (retained "offline") arrives when the broker sees the socket die.
                took = await wait_for(lambda: hub.fleet.mqtt_status.get(device) == "offline", timeout=5)
                assert took < 5
                assert [d.status for d in await client.devices()] == ["offline"]
                after = await client.generate("the cat", model=model, max_tokens=4)
                assert after.placement is not None and after.placement.kind == "cloud"
                assert after.text == before.text  # same weights, greedy
        finally:
            kill(proc)


async def test_agent_reconnects_after_hub_restart(tmp_path: Path, tiny_model: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        port = hub.port
        ra = await start_agent(hub, tiny_model, tmp_path / "agent", "edge-1")
        device = ra.device_id
    ra.agent.config = type(ra.agent.config)(**{**ra.agent.config.__dict__, "backoff_max_s": 0.5})
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none", listen=f"127.0.0.1:{port}") as hub:
        took = await wait_for(lambda: hub.fleet.status_of(device) == "online", timeout=10)
        assert took < 10
        assert hub.store.get_device(device) is not None, "the registry record survived the restart"
        await ra.close()


# -- security ---------------------------------------------------------------------------------------


async def test_enrollment_tokens_are_checked(tmp_path: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        async with grpc.aio.insecure_channel(hub.address) as channel:
            stub = pb_grpc.RegistryStub(channel)

            async def enroll(token: str) -> grpc.aio.AioRpcError | None:
                try:
                    await stub.Enroll(pb.EnrollRequest(token=token, name="d", profile="cpu-2core"))
                except grpc.aio.AioRpcError as exc:
                    return exc
                return None

            unknown = await enroll("tdt_not-a-token")
            assert unknown is not None and unknown.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "unknown" in unknown.details()
            good = hub.registry.create_token()
            assert await enroll(good) is None
            reused = await enroll(good)
            assert (
                reused is not None and reused.code() == grpc.StatusCode.UNAUTHENTICATED and "used" in reused.details()
            )
            short = hub.registry.create_token(ttl_s=0.05)
            await asyncio.sleep(0.1)
            expired = await enroll(short)
            assert expired is not None and expired.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "expired" in expired.details()
            bad_profile = await enroll_with(stub, hub.registry.create_token(), profile="toaster")
            assert bad_profile.code() == grpc.StatusCode.INVALID_ARGUMENT and "toaster" in bad_profile.details()


async def enroll_with(stub: pb_grpc.RegistryStub, token: str, profile: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Enroll(pb.EnrollRequest(token=token, name="d", profile=profile))
    return info.value


async def test_wrong_device_credential_is_rejected(tmp_path: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        async with grpc.aio.insecure_channel(hub.address) as channel:
            resp = await pb_grpc.RegistryStub(channel).Enroll(
                pb.EnrollRequest(token=hub.registry.create_token(), name="d", profile="cpu-2core")
            )
            md = (("x-tandem-device-id", resp.device_id), ("x-tandem-credential", resp.credential + "x"))
            call = pb_grpc.WorkChannelStub(channel).Connect(_one(pb.AgentMessage(hello=pb.Hello())), metadata=md)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.RegistryStub(channel).Deregister(pb.DeregisterRequest(), metadata=md)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert hub.store.get_device(resp.device_id) is not None


async def _one(msg: pb.AgentMessage):
    yield msg
    await asyncio.sleep(5)


async def test_api_key_is_required(tmp_path: Path, tiny_model: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=str(tiny_model), mqtt="none") as hub:
        for key in (None, "tdk_wrong"):
            async with AsyncClient(hub.address, api_key=key, timeout=10) as client:
                with pytest.raises(Unauthenticated, match="API key"):
                    await client.generate("hi", max_tokens=2)
                with pytest.raises(Unauthenticated):
                    await client.devices()


async def test_device_cannot_publish_under_another_device(tmp_path: Path, tiny_model: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=None) as hub:
        a = await start_agent(hub, tiny_model, tmp_path / "a", "a")
        b = await start_agent(hub, tiny_model, tmp_path / "b", "b")
        await a.close()  # a's own telemetry stops; its broker account stays
        seen: list[tuple[str, dict]] = []
        watcher = _mqtt(hub.broker.hub_username, hub.broker.hub_password, hub.broker.port)
        watcher.on_message = lambda c, u, m: seen.append((m.topic, json.loads(m.payload)))
        watcher.subscribe("tandem/v1/devices/+/telemetry", qos=1)
        forger = _mqtt(a.agent.creds.mqtt.username, a.agent.creds.mqtt.password, hub.broker.port)
        try:
            await asyncio.sleep(0.3)
            forger.publish(f"tandem/v1/devices/{b.device_id}/telemetry", json.dumps({"forged": 1}), qos=1)
            forger.publish(f"tandem/v1/devices/{a.device_id}/telemetry", json.dumps({"own": 1}), qos=1)
            await wait_for(lambda: any("own" in p for _, p in seen), timeout=5)
            assert not any("forged" in p for _, p in seen)
            assert any(t.endswith(f"{b.device_id}/telemetry") for t, _ in seen), "b's real telemetry flows"
        finally:
            for c in (watcher, forger):
                c.loop_stop()
                c.disconnect()
        await b.close()


def _mqtt(username: str, password: str, port: int) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


async def test_secrets_never_reach_the_logs(tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_hub(tmp_path / "hub", cloud_model=None) as hub:
        key = hub.registry.create_api_key("t")
        ra = await start_agent(hub, tiny_model, tmp_path / "agent", "edge-1")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            await client.generate("the cat", model="tiny", max_tokens=3)
        secrets = [key, ra.agent.creds.credential, ra.agent.creds.mqtt.password, ra.agent.config.token]
        await ra.close()
        broker_log = (tmp_path / "hub" / "mqtt").rglob("*.log")
        texts = [caplog.text, *(p.read_text() for p in broker_log)]
    assert "enrolled" in caplog.text, "the log was captured"
    for secret in secrets:
        assert secret and not any(secret in t for t in texts)


# -- bad input --------------------------------------------------------------------------------------


async def test_bad_requests_get_clear_errors_and_the_hub_keeps_serving(tmp_path: Path, tiny_model: Path) -> None:
    model = str(tiny_model)
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none") as hub:
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            with pytest.raises(InvalidRequest, match="empty"):
                await client.generate("", max_tokens=4)
            with pytest.raises(InvalidRequest, match="max_tokens"):
                await client.generate("hi", max_tokens=0)
            with pytest.raises(InvalidRequest, match="exceeds the hub's limit"):
                await client.generate("hi", max_tokens=10**6)
            with pytest.raises(InvalidRequest, match="exceeds the hub's limit of 65536"):
                await client.generate("x" * 70_000, max_tokens=4)
            with pytest.raises(InvalidRequest, match="top_p"):
                await client.generate("hi", max_tokens=4, top_p=7.0)
            with pytest.raises(InvalidRequest, match="budget values"):
                await client.generate("hi", max_tokens=4, budget=Budget(ttft_ms=-1))
            with pytest.raises(InvalidRequest, match="model 'gpt-9' is not served"):
                await client.generate("hi", model="gpt-9", max_tokens=4)
            with pytest.raises(BudgetUnsatisfiable, match="binding constraint ttft_ms") as info:
                await client.generate("hi", max_tokens=4, budget=Budget(ttft_ms=0.001))
            assert info.value.binding == "ttft_ms"
            ok = await client.generate("the cat", max_tokens=4, budget=Budget(ttft_ms=0.001, best_effort=True))
            assert ok.completion_tokens == 4


async def test_oversized_message_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    async with running_hub(
        tmp_path / "hub", cloud_model=str(tiny_model), mqtt="none", max_message_bytes=200_000
    ) as hub:
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            with pytest.raises(Exception) as info:
                await client.generate("y" * 300_000, max_tokens=4)
            assert getattr(info.value, "code", "") == "RESOURCE_EXHAUSTED"
            assert (await client.generate("the cat", max_tokens=2)).completion_tokens == 2


async def test_malformed_work_channel_messages(tmp_path: Path, tiny_model: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=str(tiny_model), mqtt="none") as hub:
        key = hub.registry.create_api_key("t")
        async with grpc.aio.insecure_channel(hub.address) as channel:
            for first in (pb.AgentMessage(tokens=pb.TokenChunk(work_id="x")), pb.AgentMessage()):
                resp = await pb_grpc.RegistryStub(channel).Enroll(
                    pb.EnrollRequest(token=hub.registry.create_token(), name="d", profile="cpu-2core")
                )
                md = (("x-tandem-device-id", resp.device_id), ("x-tandem-credential", resp.credential))
                call = pb_grpc.WorkChannelStub(channel).Connect(_one(first), metadata=md)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "Hello" in info.value.details()
            # After a good Hello, an unexpected message kind ends that stream with INVALID_ARGUMENT.
            hello = pb.AgentMessage(hello=pb.Hello(max_concurrency=1))

            async def bad_after_hello():
                yield hello
                await asyncio.sleep(0.2)
                yield pb.AgentMessage(kv=pb.KVBlock(work_id="nope"))
                await asyncio.sleep(5)

            call = pb_grpc.WorkChannelStub(channel).Connect(bad_after_hello(), metadata=md)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kv" in info.value.details()
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            assert (await client.generate("the cat", max_tokens=3)).completion_tokens == 3


async def test_no_placement_for_chat_on_a_base_model(tmp_path: Path) -> None:
    from tests.tiny import TinySpec, write_tiny_gguf

    base = write_tiny_gguf(
        tmp_path / "base.gguf", TinySpec(arch="gemma3", n_layers=2, n_heads=2, n_kv_heads=1, head_dim=256)
    )
    async with running_hub(tmp_path / "hub", cloud_model=str(base), mqtt="none") as hub:
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            with pytest.raises(Unavailable, match="chat request"):
                await client.generate(CHAT, max_tokens=3)
            with pytest.raises(InvalidRequest, match="base model"):
                await client.generate(CHAT, model=str(base), max_tokens=3)
            assert (await client.generate("the", max_tokens=3)).completion_tokens == 3


def test_generated_protocol_code_is_up_to_date() -> None:
    import subprocess
    import sys

    from tests.hubkit import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "scripts.gen_proto", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr


async def test_deregister_removes_the_device_and_its_channel(tmp_path: Path, tiny_model: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        ra = await start_agent(hub, tiny_model, tmp_path / "agent", "edge-1")
        device = ra.device_id
        async with grpc.aio.insecure_channel(hub.address) as channel:
            await pb_grpc.RegistryStub(channel).Deregister(pb.DeregisterRequest(), metadata=ra.agent.creds.metadata())
        assert hub.store.get_device(device) is None
        await wait_for(lambda: hub.fleet.status_of(device) == "offline", timeout=5)
        # The agent's saved credential no longer works: it stops instead of retrying forever.
        from edge_agent.credentials import EnrollmentRejected

        with pytest.raises(EnrollmentRejected, match="rejected this device's credential"):
            await asyncio.wait_for(ra.task, 15)


async def test_overload_is_refused_at_once_over_grpc(tmp_path: Path, tiny_model: Path) -> None:
    from cloud_hub.hub_requests import Limits
    from tandem import Overloaded

    async with running_hub(
        tmp_path / "hub", cloud_model=str(tiny_model), mqtt="none", limits=Limits(max_inflight=1)
    ) as hub:
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            first = client.stream("the cat", max_tokens=200)
            await anext(first)  # one request in flight: the hub is at its bound
            start = asyncio.get_running_loop().time()
            with pytest.raises(Overloaded, match="limit"):
                await client.generate("the cat", max_tokens=2)
            assert asyncio.get_running_loop().time() - start < 1.0, "refused at once, not queued"
            await first.aclose()
            await wait_for(lambda: hub.service.inflight == 0, timeout=5)
            assert (await client.generate("the cat", max_tokens=2)).completion_tokens == 2


async def test_health_reflects_readiness(tmp_path: Path, tiny_model: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def inference_status(address: str) -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            req = health_pb2.HealthCheckRequest(service="tandem.v1.Inference")
            return (await health_pb2_grpc.HealthStub(channel).Check(req)).status

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def becomes(address: str, expected: int) -> None:
        for _ in range(50):  # the hub re-evaluates readiness every 0.5 s
            if await inference_status(address) == expected:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"Inference health never became {expected}")

    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        await becomes(hub.address, not_serving)  # no device and no cloud model: not ready
        ra = await start_agent(hub, tiny_model, tmp_path / "agent", "edge-1")
        await becomes(hub.address, serving)
        await ra.close()
        await becomes(hub.address, not_serving)
