"""Restarts: the hub with 20 agents connected, and the broker under a spooling agent."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_agent.agent import Agent, AgentConfig
from models.runtime import load
from models.serving import ServedModel
from tests.hubkit import needs_mosquitto, running_hub, start_agent, tiny_llama, wait_for

pytestmark = needs_mosquitto


async def test_hub_restart_with_20_agents(tmp_path: Path) -> None:
    engine = ServedModel("tiny", load(tiny_llama(tmp_path), use_cache=False))  # shared: nothing is served here
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        port = hub.port
        agents, stops, tasks = [], [], []
        for i in range(20):
            config = AgentConfig(hub=hub.address, profile="cpu-2core", state_dir=tmp_path / f"a{i}", name=f"a{i}",
                                 token=hub.registry.create_token())  # fmt: skip
            agents.append(Agent(config, engine))
            stops.append(asyncio.Event())
            tasks.append(asyncio.create_task(agents[-1].run(stops[-1])))
        await wait_for(lambda: len(hub.fleet.online()) == 20, timeout=30)
        before = {d.device_id: d.credential_hash for d in hub.store.list_devices()}
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none", listen=f"127.0.0.1:{port}") as hub:
        took = await wait_for(lambda: len(hub.fleet.online()) == 20, timeout=10)
        after = {d.device_id: d.credential_hash for d in hub.store.list_devices()}
        assert after == before, "no registry record or credential lost"
        print(f"20 agents back online {took:.1f} s after the hub restarted")
        for stop in stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)


async def test_broker_restart_replays_spooled_telemetry_in_order(tmp_path: Path) -> None:
    async with running_hub(tmp_path / "hub", cloud_model=None) as hub:
        ra = await start_agent(hub, tiny_llama(tmp_path), tmp_path / "agent", "edge-1")
        seqs: list[int] = []
        watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        watcher.username_pw_set(hub.broker.hub_username, hub.broker.hub_password)
        watcher.on_connect = lambda c, *a: c.subscribe(f"tandem/v1/devices/{ra.device_id}/telemetry", qos=1)
        watcher.on_message = lambda c, u, m: seqs.append(json.loads(m.payload)["seq"])
        watcher.reconnect_delay_set(0.2, 1)
        watcher.connect("127.0.0.1", hub.broker.port)
        watcher.loop_start()
        try:
            await wait_for(lambda: len(seqs) >= 3, timeout=10)
            await asyncio.to_thread(hub.broker.stop)
            outage_start = time.monotonic()
            await wait_for(lambda: len(ra.agent.telemetry.spool) >= 8, timeout=10)  # sampled every 0.2 s
            spooled = len(ra.agent.telemetry.spool)
            await asyncio.to_thread(hub.broker.start)
            outage = time.monotonic() - outage_start
            await wait_for(lambda: len(ra.agent.telemetry.spool) == 0 and len(seqs) > 3 + spooled, timeout=15)
        finally:
            watcher.loop_stop()
            watcher.disconnect()
        # Delivered in order, with no gap: everything sampled during the outage arrived afterwards.
        ordered = sorted(set(seqs))
        assert ordered == list(range(ordered[0], ordered[-1] + 1)), "no record lost"
        assert [s for i, s in enumerate(seqs) if i == 0 or s > seqs[i - 1]] == ordered, "in order"
        print(f"{spooled}+ records spooled during a {outage:.1f} s broker outage, all replayed in order")
        await ra.close()
