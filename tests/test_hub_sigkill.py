"""SIGKILL of the hub (`tandem hub up` as a real process) with 2 agents publishing telemetry, then
`hub up` again on the same data directory and port: no broker of the old hub is left, telemetry
flows again within 15 s, and every record the agents spooled meanwhile reaches the hub, in order.

What the hub receives is seen inside it: the hub process runs `tandem_cli.main` with a tap on
`Fleet.update_telemetry` (where the ingest hands each telemetry message over) that appends
`device seq ts arrival` to a file, line by line, so the lines survive the SIGKILL. The agents'
sequence numbers (edge_agent.spool) are strictly increasing, so a gap is a lost record.

One loss is inherent and allowed: records that the old broker had acknowledged but the hub had not
processed when it died (in its socket buffer, or published in the milliseconds between the hub's
death and its broker's). The check proves that every missing record was sampled before the old
broker died: none of them was spooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cloud_hub.registry import create_token
from cloud_hub.store import open_store
from edge_agent.agent import Agent, AgentConfig
from edge_agent.credentials import load_credentials
from models.runtime import load
from models.serving import ServedModel
from tests.hubkit import ROOT, needs_mosquitto, tiny_llama

pytestmark = needs_mosquitto

INTERVAL_S = 0.2  # the agents' telemetry interval
FLOW_WITHIN_S = 15.0  # from the restart (`hub up` launched) to the agents' records drained at the new hub
# A moved broker is found at the agents' work channel reconnect, whose backoff (the agent's, up to
# 10 s, and the gRPC channel's own) comes on top of the hub's start.
MOVED_FLOW_WITHIN_S = 30.0
# Slack for the sampler's own delays when proving that a missing record was sampled before the
# old broker died (see check_sequences).
SAMPLING_SLACK_S = 0.05

_TAPPED_HUB = """
import sys, time
from cloud_hub.fleet import Fleet

tap = open(sys.argv[1], "a", buffering=1)
update = Fleet.update_telemetry

def update_telemetry(self, device_id, data):
    tap.write(f"{device_id} {data.get('seq')} {data.get('ts')} {time.time()}\\n")
    update(self, device_id, data)

Fleet.update_telemetry = update_telemetry
from tandem_cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass(frozen=True)
class Arrival:
    device: str
    seq: int
    ts: float  # when the agent sampled it
    at: float  # when the hub's ingest handed it over


@dataclass(frozen=True)
class Kill:
    killed: float  # SIGKILL sent to the hub
    broker_dead: float  # its broker's process ended
    restarted: float  # `hub up` launched again
    ready: float  # and serving


@dataclass
class HubProcess:
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)  # its output so far, read by `reader`
    reader: threading.Thread | None = None

    @classmethod
    def launch(cls, data_dir: Path, port: int, tap: Path) -> HubProcess:
        cmd = [sys.executable, "-c", _TAPPED_HUB, str(tap), "hub", "up", "--data-dir", str(data_dir),
               "--listen", f"127.0.0.1:{port}", "--mqtt", "managed"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        hub = cls(proc)
        hub.reader = threading.Thread(target=lambda: hub.lines.extend(proc.stdout), daemon=True)
        hub.reader.start()
        return hub

    async def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any("hub ready on" in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("hub did not start:\n" + "".join(self.lines[-30:]))
            await asyncio.sleep(0.05)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self.reader is not None:
            self.reader.join(5)  # the output ends with the process
        self.proc.stdout.close()


def brokers_of(conf: Path) -> list[int]:
    """Live `mosquitto -c <conf>` processes (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if len(argv) >= 3 and argv[0].endswith(b"mosquitto") and argv[1:3] == [b"-c", bytes(conf)]:
                pids.append(int(entry.name))
    return pids


def wait_exit(pid: int, timeout: float) -> float:
    """Block until pid (not our child) has exited; returns the time.time() it was seen to."""
    fd = os.pidfd_open(pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise AssertionError(f"broker pid {pid} still running {timeout} s after its hub was killed")
        return time.time()
    finally:
        os.close(fd)


def arrivals(tap: Path) -> list[Arrival]:
    out = []
    for line in tap.read_text().splitlines():
        device, seq, ts, at = line.split()
        out.append(Arrival(device, int(seq), float(ts), float(at)))
    return out


def check_sequences(received: list[Arrival], devices: list[str], kills: list[Kill]) -> tuple[dict[str, int], int]:
    """Each device's records arrived in order from seq 1, with no gap but the inherent one (see the
    module docstring). Returns how many records each device had spooled across all the outages, and
    how many were lost in flight at a kill."""
    spooled, in_flight = {}, 0
    for device in devices:
        firsts: dict[int, Arrival] = {}
        for a in received:  # a record can arrive twice (re-sent after a lost acknowledgement)
            if a.device == device:
                firsts.setdefault(a.seq, a)
        seqs = list(firsts)
        assert seqs == sorted(seqs) and seqs[0] == 1, f"{device}: records out of order"
        for prev, nxt in itertools.pairwise(seqs):
            if nxt == prev + 1:
                continue
            a, b = firsts[prev], firsts[nxt]
            kill = next((k for k in kills if a.at < k.killed and b.at > k.restarted), None)
            assert kill is not None, f"{device}: records {prev + 1}..{nxt - 1} lost while the hub was up"
            # The last missing record was sampled at least one interval before b: before the broker died.
            lost = f"{device}: records {prev + 1}..{nxt - 1} lost, some sampled after the old broker died"
            assert b.ts - INTERVAL_S < kill.broker_dead + SAMPLING_SLACK_S, lost
            in_flight += nxt - prev - 1
        spooled[device] = sum(1 for a in firsts.values() if any(k.broker_dead < a.ts < k.ready for k in kills))
    return spooled, in_flight


def drained_since(tap: Path, devices: list[str], since: float) -> bool:
    """Each device has a record sampled after `since` at the hub."""
    received = arrivals(tap)
    return all(any(r.device == d and r.ts > since for r in received) for d in devices)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_sigkill_restarts(tmp_path: Path, rounds: int, move_broker: bool = False) -> None:
    """Start a hub and 2 agents, then `rounds` times: SIGKILL the hub and start it again. With
    move_broker, another process holds the broker's old port meanwhile, so it moves."""
    data_dir, tap, port = tmp_path / "hub", tmp_path / "tap.txt", free_port()
    hubs = [HubProcess.launch(data_dir, port, tap)]  # every one started, for the cleanup
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    try:
        await hubs[0].ready()
        agents = start_agents(tmp_path, data_dir, port, stop, tasks)
        await wait_until(lambda: all(a.creds for a in agents), 30)
        devices = [a.creds.device_id for a in agents]
        await wait_until(lambda: all(sum(r.device == d for r in arrivals(tap)) >= 5 for d in devices), 30)
        kills: list[Kill] = []
        for _ in range(rounds):
            kills.append(await sigkill_and_restart(hubs, data_dir, port, tap, devices, move_broker))
        spooled, in_flight = check_sequences(arrivals(tap), devices, kills)
        assert all(n >= 5 * rounds for n in spooled.values()), spooled
        print(f"records spooled in {rounds} outages, all delivered in order: {spooled}; lost in flight: {in_flight}")
        if move_broker:
            moved = int((data_dir / "mqtt" / "port").read_text())
            assert all(a.creds.mqtt.port == moved for a in agents), "the agents follow the hub's broker"
            assert all(load_credentials(a.config.state_dir).mqtt.port == moved for a in agents), "and save it"
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        for hub in hubs:
            hub.kill_group()


def start_agents(tmp_path: Path, data_dir: Path, port: int, stop: asyncio.Event, tasks: list) -> list[Agent]:
    """Two in-process agents enrolled with tokens from the hub's registry, running until `stop`."""
    store = open_store("sqlite", data_dir)
    tokens = [create_token(store, 600) for _ in range(2)]
    store.close()
    engine = ServedModel("tiny", load(tiny_llama(tmp_path), use_cache=False))  # nothing is served here
    agents = []
    for i, token in enumerate(tokens):
        config = AgentConfig(hub=f"127.0.0.1:{port}", profile="cpu-2core", state_dir=tmp_path / f"agent{i}",
                             name=f"edge-{i}", token=token, telemetry_interval_s=INTERVAL_S)  # fmt: skip
        agents.append(Agent(config, engine))
        tasks.append(asyncio.create_task(agents[-1].run(stop)))
    return agents


async def sigkill_and_restart(
    hubs: list[HubProcess], data_dir: Path, port: int, tap: Path, devices: list[str], move_broker: bool
) -> Kill:
    """SIGKILL the last hub alone (its broker gets no stop), start another (appended to hubs); check
    the old broker is gone and telemetry drains to the new hub within FLOW_WITHIN_S of the restart."""
    conf = data_dir / "mqtt" / "mosquitto.conf"
    [old_broker] = brokers_of(conf)
    killed = time.time()
    os.kill(hubs[-1].proc.pid, signal.SIGKILL)
    await asyncio.to_thread(hubs[-1].proc.wait, 10)
    broker_dead = await asyncio.to_thread(wait_exit, old_broker, 5.0)
    with contextlib.ExitStack() as held:
        if move_broker:  # someone else takes the old port while the hub is down
            blocker = held.enter_context(socket.socket())
            blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the old connections in TIME_WAIT
            blocker.bind(("127.0.0.1", int((data_dir / "mqtt" / "port").read_text())))
            blocker.listen()
        await asyncio.sleep(1.0)  # an outage long enough to spool a few records at 5 a second
        restarted = time.time()
        hubs.append(HubProcess.launch(data_dir, port, tap))
        await hubs[-1].ready()
        ready = time.time()
        assert brokers_of(conf) != [old_broker] and len(brokers_of(conf)) == 1, "no broker of the old hub left"
        # Drained: each device has a record sampled after the restart at the hub, so (in order)
        # everything it spooled before has arrived too.
        within = MOVED_FLOW_WITHIN_S if move_broker else FLOW_WITHIN_S
        await wait_until(lambda: drained_since(tap, devices, ready), restarted + within - time.time())
    flowing = max(min(r.at for r in arrivals(tap) if r.device == d and r.at > restarted) for d in devices)
    print(
        f"broker ended {1000 * (broker_dead - killed):.0f} ms after the SIGKILL; hub ready "
        f"{ready - restarted:.1f} s after the restart, telemetry flowing {flowing - restarted:.1f} s after it"
    )
    return Kill(killed, broker_dead, restarted, ready)


async def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.1f} s")
        await asyncio.sleep(0.05)


async def test_hub_sigkill_then_restart_three_times(tmp_path: Path) -> None:
    await run_sigkill_restarts(tmp_path, rounds=3)


async def test_agents_follow_a_broker_that_moved(tmp_path: Path) -> None:
    # Its saved port taken, the restarted hub's broker listens elsewhere: the agents learn the new
    # address from the hub at their reconnect, not from what they saved at enrollment.
    await run_sigkill_restarts(tmp_path, rounds=1, move_broker=True)
