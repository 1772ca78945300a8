"""Hub load benchmark: concurrent SDK streams, hub overhead, telemetry ingest.

Three processes, so that the hub is measured alone: the hub (`tandem hub up`, managed Mosquitto),
one process hosting the agents (each serving a tiny random-weight model), and this one driving
N concurrent streams with the AsyncClient.

- Requests/s and errors for N concurrent streams.
- Hub overhead, the hub's own time, which it measures and returns in every answer's metrics:
  routing and dispatch (arrival to the work leaving the hub) plus relaying each token (arrival
  from the agent to hand-off to the caller's stream); per request, and per token.
- End-to-end overhead: the hub's TTFT (arrival to first token sent) minus the agent's engine TTFT
  (work received to first token produced; queueing for the engine counts as engine time), i.e.
  hub plus both gRPC hops plus the agent's own plumbing; per token likewise.
- Telemetry ingest: P publishers (each an enrolled device, ACL-checked by the broker) send QoS-0
  telemetry as fast as they can for a few seconds; the rate is what the hub's ingest counted.

    python benchmarks/hub_load.py --streams 200 --agents 20 [--json] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
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

        async def one(i: int) -> None:
            result = GenerateResult()
            try:
                async for _ in client.stream(f"the cat {i}", model="tiny", max_tokens=max_tokens, result=result):
                    pass
                results.append(result)
            except Exception as exc:  # counted, reported
                results.append(exc)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        wall = time.perf_counter() - start
    ok = [r for r in results if not isinstance(r, Exception)]
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, Exception)]
    return {"wall_s": wall, "ok": ok, "errors": errors}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def telemetry_rate(
    data_dir: Path, broker_port: int, hub_metrics_url: str, publishers: int, seconds: float, hub_address: str
) -> dict:
    """Enroll `publishers` devices, blast QoS-0 telemetry, and read the hub's ingest counter."""
    import grpc
    import httpx
    import paho.mqtt.client as mqtt

    from tandem.v1 import tandem_pb2 as pb
    from tandem.v1 import tandem_pb2_grpc as pb_grpc

    def counted() -> float:
        text = httpx.get(hub_metrics_url, timeout=10).text
        line = next(x for x in text.splitlines() if x.startswith("tandem_telemetry_messages_total"))
        return float(line.split()[-1])

    hub = os.environ.get("HUB_ADDR") or hub_address
    clients = []
    with grpc.insecure_channel(hub) as channel:
        for i in range(publishers):
            resp = pb_grpc.RegistryStub(channel).Enroll(
                pb.EnrollRequest(token=token(data_dir), name=f"pub-{i}", profile="cpu-2core")
            )
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            c.username_pw_set(resp.mqtt.username, resp.mqtt.password)
            c.connect("127.0.0.1", broker_port)
            c.loop_start()
            clients.append((c, f"{resp.mqtt.topic_prefix}/telemetry"))
    time.sleep(1.0)
    before, sent = counted(), 0
    payload = json.dumps({"load": 0.5, "queue_depth": 1, "power_w": 5.0, "memory_mb": 300.0})
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for c, topic in clients:
            for _ in range(20):
                c.publish(topic, payload, qos=0)
            sent += 20
    time.sleep(1.0)  # let the broker and the hub drain
    elapsed = time.perf_counter() - start
    received = counted() - before
    for c, _ in clients:
        c.loop_stop()
        c.disconnect()
    return {
        "publishers": publishers,
        "sent": sent,
        "ingested": received,
        "msgs_per_s": received / elapsed,
        "window_s": elapsed,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--publishers", type=int, default=20)
    p.add_argument("--seconds", type=float, default=5.0)
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
    )
    procs = [hub]
    try:
        assert "hub ready" in hub.stdout.readline()
        agents = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--agents-worker",
                str(args.agents),
                "--hub",
                hub_addr,
                "--data-dir",
                str(work / "hub"),
                "--model",
                str(model),
            ],
            env=env,
        )
        procs.append(agents)
        key = (work / "key").read_text().strip()
        summary = asyncio.run(_measure(hub_addr, key, args))
        broker_port = int((work / "hub" / "mqtt" / "mosquitto.conf").read_text().split("listener ")[1].split()[0])
        summary["telemetry"] = telemetry_rate(
            work / "hub", broker_port, f"http://127.0.0.1:{http_port}/metrics", args.publishers, args.seconds, hub_addr
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


async def _measure(hub: str, key: str, args: argparse.Namespace) -> dict:
    from tandem import AsyncClient

    async with AsyncClient(hub, api_key=key, timeout=30) as client:
        deadline = time.time() + 120
        while sum(d.status == "online" for d in await client.devices()) < args.agents:
            if time.time() > deadline:
                raise RuntimeError("agents did not come online")
            await asyncio.sleep(0.5)
    await drive(hub, key, min(args.streams, 20), args.max_tokens)  # warm-up
    single = []
    for _ in range(50):  # one stream at a time: the overhead without CPU contention
        single += (await drive(hub, key, 1, args.max_tokens))["ok"]
    run = await drive(hub, key, args.streams, args.max_tokens)
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
        "hub_ms_per_token_p50": percentile(hub_tok, 0.5),
        "hub_ms_per_token_p99": percentile(hub_tok, 0.99),
        "single_stream_hub_ms_per_request_p50": percentile([r.hub_route_ms + r.hub_relay_ms for r in single], 0.5),
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
