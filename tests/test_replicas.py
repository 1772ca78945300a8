"""Two hub processes on one PostgreSQL registry both see every device."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc

from tandem import AsyncClient
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tests.hubkit import ROOT, running_hub, start_agent, tiny_llama, wait_for
from tests.pg import fresh_database


async def test_two_hubs_share_one_postgres_registry(tmp_path: Path, pg_server: str) -> None:
    url = fresh_database(pg_server)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port_b = s.getsockname()[1]
    hub_b = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem_cli",
            "hub",
            "up",
            "--registry",
            url,
            "--mqtt",
            "none",
            "--listen",
            f"127.0.0.1:{port_b}",
            "--data-dir",
            str(tmp_path / "b"),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        async with running_hub(tmp_path / "a", cloud_model=None, mqtt="none", registry=url) as hub_a:
            key = hub_a.registry.create_api_key("shared")  # stored in PostgreSQL: valid on both replicas
            agent = await start_agent(hub_a, tiny_llama(tmp_path), tmp_path / "agent", "via-a")
            lines = []  # log lines may come first (asyncio's slow-callback warnings on a loaded host)
            while not lines or ("hub ready" not in lines[-1] and lines[-1] and len(lines) < 50):
                lines.append(await asyncio.to_thread(hub_b.stdout.readline))
            assert "hub ready" in lines[-1], "".join(lines)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as channel:
                enrolled = await pb_grpc.RegistryStub(channel).Enroll(
                    pb.EnrollRequest(token=hub_a.registry.create_token(), name="via-b", profile="cpu-2core")
                )
            for address in (hub_a.address, f"127.0.0.1:{port_b}"):
                async with AsyncClient(address, api_key=key, timeout=10) as client:
                    devices = {d.name: d for d in await client.devices()}
                assert set(devices) == {"via-a", "via-b"}, address
                assert devices["via-a"].device_id == agent.device_id
                assert devices["via-a"].status == "online"  # hub B reads A's record of the open channel
                assert devices["via-b"].device_id == enrolled.device_id
            await agent.close()
            await wait_for(lambda: hub_a.store.get_device(agent.device_id).status == "offline", timeout=5)
    finally:
        hub_b.send_signal(signal.SIGTERM)
        assert hub_b.wait(15) == 0
