"""Hub load benchmark: concurrent SDK streams, hub overhead, telemetry ingest.

Three processes, so that the hub is measured alone: the hub (`tandem hub up`, managed Mosquitto),
one process hosting the agents (each serving a tiny random-weight model), and this one driving
N concurrent streams with the AsyncClient.

- Requests/s and errors for N concurrent streams.
- Hub overhead, the hub's own time, which it measures and returns in every answer's metrics:
  authentication, routing and dispatch (arrival to the work leaving the hub) plus relaying each
  token and the answer's end (arrival from the agent to hand-off to the caller's stream); per
  request, and per token.
- Hub CPU: the hub process's CPU time (every thread, gRPC's included) over the run, per request:
  all it did, also outside the stretches it times (gRPC receiving and sending, the event loop).
- End-to-end overhead: the hub's TTFT (arrival to first token sent) minus the agent's engine TTFT
  (work received to first token produced; queueing for the engine counts as engine time), i.e.
  hub plus both gRPC hops plus the agent's own plumbing; per token likewise.
- Telemetry ingest: P publishers (each an enrolled device, ACL-checked by the broker) send QoS-0
  telemetry as fast as they can for a few seconds, as pre-encoded PUBLISH packets over raw sockets
  (paho clients could not outrun the hub; `--publisher paho` keeps them for comparison); the rate
  is the growth of the hub's ingest counter over the steady part of the window.

    python benchmarks/hub_load.py --streams 200 --agents 20 [--json] [--write-docs]
    python benchmarks/hub_load.py --telemetry-only [--publisher raw|paho] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402

TANDEM = [sys.executable, "-m", "tandem.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token(data_dir: Path) -> str:
    cmd = [*TANDEM, "hub", "token", "create", "--data-dir", str(data_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


async def agents_worker(hub: str, data_dir: Path, count: int, model: str, work: Path) -> None:
    """Host `count` agents in this process until SIGTERM; they share one engine (one model)."""
    import torch

    torch.set_num_threads(1)  # leave the second core to the hub: this measures the hub, not the engine
    from edge_agent.agent import Agent, AgentConfig
    from edge_agent.engine import LocalEngine
    from models.runtime import load

    engine = LocalEngine("tiny", load(model, use_cache=False))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    agents = [
        Agent(
            AgentConfig(
                hub=hub, profile="cpu-2core", state_dir=work / f"a{i}", name=f"load-{i}", token=token(data_dir)
            ),
            engine,
        )
        for i in range(count)
    ]
    await asyncio.gather(*(a.run(stop) for a in agents))


async def drive(hub: str, key: str, streams: int, max_tokens: int) -> dict:
    from tandem import AsyncClient
    from tandem.types import GenerateResult

    async with AsyncClient(hub, api_key=key, timeout=120) as client:
        results: list[GenerateResult | Exception] = []
        pieces: list[int] = []  # messages with tokens each stream received (merged tokens arrive as one)

        async def one(i: int) -> None:
            result, n = GenerateResult(), 0
            try:
                async for _ in client.stream(f"the cat {i}", model="tiny", max_tokens=max_tokens, result=result):
                    n += 1
                results.append(result)
                pieces.append(n)
            except Exception as exc:  # counted, reported
                results.append(exc)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        wall = time.perf_counter() - start
    ok = [r for r in results if not isinstance(r, Exception)]
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, Exception)]
    return {"wall_s": wall, "ok": ok, "errors": errors, "pieces": pieces}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def telemetry_rate(
    data_dir: Path,
    broker_port: int,
    hub_metrics_url: str,
    publishers: int,
    seconds: float,
    hub_address: str,
    publisher: str = "raw",
) -> dict:
    """Enroll `publishers` devices, blast QoS-0 telemetry, and read the hub's ingest counter.

    The rate is the counter's growth over the steady part of the window (from 0.5 s after the first
    message to the end of sending), so neither ramp-up nor the drain afterwards dilutes it. `sent`
    far above `ingested` means the hub (or the broker, which drops QoS 0 for a slow subscriber)
    was the limit, not the publishers.
    """
    import httpx

    def counted() -> float:
        text = httpx.get(hub_metrics_url, timeout=10).text
        line = next(x for x in text.splitlines() if x.startswith("tandem_telemetry_messages_total"))
        return float(line.split()[-1])

    creds = _enroll(data_dir, os.environ.get("HUB_ADDR") or hub_address, publishers)
    payload = json.dumps({"load": 0.5, "queue_depth": 1, "power_w": 5.0, "memory_mb": 300.0}).encode()
    before = counted()
    start = time.perf_counter()
    stop_at = start + seconds
    blast = {"raw": _blast_raw, "paho": _blast_paho}[publisher]
    result: dict[str, int] = {}
    sender = threading.Thread(target=lambda: result.update(sent=blast(broker_port, creds, payload, stop_at)))
    sender.start()
    time.sleep(min(0.5, seconds / 4))
    t0, c0 = time.perf_counter(), counted()
    sender.join()
    t1, c1 = time.perf_counter(), counted()
    time.sleep(1.0)  # let the broker and the hub drain
    received = counted() - before
    return {
        "publishers": publishers,
        "publisher": publisher,
        "sent": result.get("sent", 0),
        "ingested": received,
        "msgs_per_s": (c1 - c0) / (t1 - t0),
        "window_s": t1 - t0,
        "send_s": t1 - start,
    }


def _enroll(data_dir: Path, hub: str, publishers: int) -> list[tuple[str, str, str]]:
    """(MQTT username, password, telemetry topic) for `publishers` newly enrolled devices."""
    import grpc

    from tandem.v1 import tandem_pb2 as pb
    from tandem.v1 import tandem_pb2_grpc as pb_grpc

    creds = []
    with grpc.insecure_channel(hub) as channel:
        for i in range(publishers):
            resp = pb_grpc.RegistryStub(channel).Enroll(
                pb.EnrollRequest(token=token(data_dir), name=f"pub-{i}", profile="cpu-2core")
            )
            creds.append((resp.mqtt.username, resp.mqtt.password, f"{resp.mqtt.topic_prefix}/telemetry"))
    return creds


def _publish_packet(topic: str, payload: bytes) -> bytes:
    """An MQTT v5 QoS-0 PUBLISH: topic, empty property block, payload."""
    from cloud_hub.mqtt_codec import varint

    raw = topic.encode()
    body = len(raw).to_bytes(2, "big") + raw + b"\x00" + payload
    return b"\x30" + varint(len(body)) + body


def _blast_raw(port: int, creds: list[tuple[str, str, str]], payload: bytes, stop_at: float) -> int:
    """One socket and thread per device, each writing a pre-encoded run of PUBLISH packets per `sendall`.

    Encoding costs nothing per message and `sendall` releases the GIL, so 20 publishers in one process
    can outrun the broker and the hub; paho's publish() (a Python-level encode and lock per message)
    could not on a busy 2-core host, where `sent` came close to `ingested`.
    """
    from cloud_hub.mqtt_codec import DISCONNECT_PACKET, connect_packet

    per_send = 200
    sent = [0] * len(creds)

    def one(i: int, username: str, password: str, topic: str) -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(connect_packet(f"{username}-load", username, password, 0, 1 << 20))
            connack = s.recv(256)
            if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
                raise RuntimeError(f"publisher {username} refused: {connack!r}")
            run = _publish_packet(topic, payload) * per_send
            while time.perf_counter() < stop_at:
                s.sendall(run)
                sent[i] += per_send
            s.sendall(DISCONNECT_PACKET)

    threads = [threading.Thread(target=one, args=(i, *c)) for i, c in enumerate(creds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(sent)


def _blast_paho(port: int, creds: list[tuple[str, str, str]], payload: bytes, stop_at: float) -> int:
    """The original driver: paho clients on their network threads, publish() in a loop from one thread."""
    import paho.mqtt.client as mqtt

    clients = []
    for username, password, topic in creds:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.username_pw_set(username, password)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append((c, topic))
    sent = 0
    while time.perf_counter() < stop_at:
        for c, topic in clients:
            for _ in range(20):
                c.publish(topic, payload, qos=0)
            sent += 20
    for c, _ in clients:
        c.loop_stop()
        c.disconnect()
    return sent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--publishers", type=int, default=20)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--publisher", choices=("raw", "paho"), default="raw", help="telemetry publishers (see _blast_raw)")
    p.add_argument("--telemetry-only", action="store_true", help="skip the agents and streams")
    p.add_argument(
        "--pin-hub",
        action="store_true",
        help="the hub (and its broker) on core 0, this driver and the agents on the others, as in a deployment "
        "where the hub has a machine of its own (Linux)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--agents-worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--hub", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.agents_worker:
        work = Path(tempfile.mkdtemp(prefix="tandem-agents-"))
        asyncio.run(agents_worker(args.hub, Path(args.data_dir), args.agents_worker, args.model, work))
        return

    from tests.tiny import TinySpec, write_tiny_gguf

    work = Path(tempfile.mkdtemp(prefix="tandem-load-"))
    model = write_tiny_gguf(work / "tiny.gguf", TinySpec(arch="llama", n_layers=2, context_length=256))
    port, http_port = free_port(), free_port()
    hub_addr = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HUB_ADDR": hub_addr}
    pin = None
    if args.pin_hub:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            sys.exit("--pin-hub needs at least 2 cores")
        os.sched_setaffinity(0, cores[1:])  # this driver, and the agents' process it starts, inherit it
        pin = functools.partial(os.sched_setaffinity, 0, cores[:1])  # the hub's threads and broker inherit it
    hub = subprocess.Popen(
        [
            *TANDEM,
            "hub",
            "up",
            "--data-dir",
            str(work / "hub"),
            "--listen",
            hub_addr,
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--api-key-file",
            str(work / "key"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=pin,
    )
    procs = [hub]
    summary: dict = {}
    try:
        assert "hub ready" in hub.stdout.readline()
        if not args.telemetry_only:
            summary = _streams(args, hub_addr, work, model, env, procs)
        broker_port = int((work / "hub" / "mqtt" / "mosquitto.conf").read_text().split("listener ")[1].split()[0])
        metrics = f"http://127.0.0.1:{http_port}/metrics"
        summary["telemetry"] = telemetry_rate(
            work / "hub", broker_port, metrics, args.publishers, args.seconds, hub_addr, args.publisher
        )
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(summary) if args.json else _table(summary))
    if args.write_docs:
        _write_docs(summary, command_line())


def _streams(
    args: argparse.Namespace, hub_addr: str, work: Path, model: Path, env: dict, procs: list[subprocess.Popen]
) -> dict:
    """Start the agents' process (added to `procs` for the caller to stop) and measure the streams."""
    cmd = [sys.executable, __file__, "--agents-worker", str(args.agents), "--hub", hub_addr]
    procs.append(subprocess.Popen([*cmd, "--data-dir", str(work / "hub"), "--model", str(model)], env=env))
    key = (work / "key").read_text().strip()
    return asyncio.run(_measure(hub_addr, key, args, procs[0].pid))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process `pid` has used so far; NaN off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(hub: str, key: str, args: argparse.Namespace, hub_pid: int) -> dict:
    from tandem import AsyncClient

    async with AsyncClient(hub, api_key=key, timeout=30) as client:
        deadline = time.time() + 120
        while sum(d.status == "online" for d in await client.devices()) < args.agents:
            if time.time() > deadline:
                raise RuntimeError("agents did not come online")
            await asyncio.sleep(0.5)
    await drive(hub, key, min(args.streams, 20), args.max_tokens)  # warm-up
    single, single_pieces = [], []
    cpu0 = cpu_seconds(hub_pid)
    for _ in range(50):  # one stream at a time: the overhead without CPU contention
        alone_run = await drive(hub, key, 1, args.max_tokens)
        single += alone_run["ok"]
        single_pieces += alone_run["pieces"]
    cpu1 = cpu_seconds(hub_pid)
    run = await drive(hub, key, args.streams, args.max_tokens)
    cpu2 = cpu_seconds(hub_pid)
    ok = run["ok"]
    alone = [r.ttft_ms - r.engine_ttft_ms for r in single]
    hub_ttft = [r.ttft_ms for r in ok]
    # The hub's own time: routing and dispatch, plus relaying every token (arrival to hand-off).
    hub_req = [r.hub_route_ms + r.hub_relay_ms for r in ok]
    hub_tok = [r.hub_relay_ms / r.completion_tokens for r in ok if r.completion_tokens]
    # End to end minus engine: the hub plus both gRPC hops and the agent's own plumbing.
    overhead_req = [r.ttft_ms - r.engine_ttft_ms for r in ok]
    overhead_tok = [r.tpot_ms - r.engine_tpot_ms for r in ok if r.completion_tokens > 1]
    return {
        "streams": args.streams,
        "agents": args.agents,
        "max_tokens": args.max_tokens,
        "errors": len(run["errors"]),
        "error_examples": run["errors"][:3],
        "requests_per_s": len(ok) / run["wall_s"],
        "wall_s": run["wall_s"],
        "hub_ttft_ms_p50": percentile(hub_ttft, 0.5),
        "hub_ttft_ms_p99": percentile(hub_ttft, 0.99),
        "hub_ms_per_request_p50": percentile(hub_req, 0.5),
        "hub_ms_per_request_p99": percentile(hub_req, 0.99),
        # >1 where an agent or the hub merged queued tokens into one message
        "tokens_per_message_p50": percentile(
            [r.completion_tokens / max(n, 1) for r, n in zip(ok, run["pieces"], strict=True)], 0.5
        ),
        "single_stream_tokens_per_message_p50": percentile(
            [r.completion_tokens / max(n, 1) for r, n in zip(single, single_pieces, strict=True)], 0.5
        ),
        "hub_ms_per_token_p50": percentile(hub_tok, 0.5),
        "hub_ms_per_token_p99": percentile(hub_tok, 0.99),
        "single_stream_hub_ms_per_request_p50": percentile([r.hub_route_ms + r.hub_relay_ms for r in single], 0.5),
        "hub_cpu_ms_per_request": 1000 * (cpu2 - cpu1) / max(1, len(ok)),
        "single_stream_hub_cpu_ms_per_request": 1000 * (cpu1 - cpu0) / max(1, len(single)),
        "single_stream_overhead_ms_per_request_p50": percentile(alone, 0.5),
        "single_stream_overhead_ms_per_request_p99": percentile(alone, 0.99),
        "overhead_ms_per_request_p50": percentile(overhead_req, 0.5),
        "overhead_ms_per_request_p99": percentile(overhead_req, 0.99),
        "overhead_ms_per_token_p50": percentile(overhead_tok, 0.5),
        "overhead_ms_per_token_p99": percentile(overhead_tok, 0.99),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def _table(s: dict) -> str:
    return json.dumps(s, indent=2)


def _write_docs(summary: dict, command: str) -> None:
    write_block("hub_load", f"## Hub load\n\nCommand: `{command}`\n\n```json\n{json.dumps(summary, indent=2)}\n```")


if __name__ == "__main__":
    main()
