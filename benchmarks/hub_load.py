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
  is the growth of the hub's ingest counter over the steady part of the window, beside the hub
  process's CPU time per message. `--ingest ours,gmqtt` runs one hub per MQTT client (ours,
  `cloud_hub.mqtt_ingest`, and gmqtt through `GmqttSubscriber`), all up at once, and measures them in
  turn for `--rounds` rounds, the order reversed every round; the ratio is the median of the rounds'
  ratios.

    python benchmarks/hub_load.py --streams 200 --agents 20 [--json] [--write-docs]
    python benchmarks/hub_load.py --telemetry-only [--publisher raw|paho] [--seconds 5]
    python benchmarks/hub_load.py --telemetry-only --pin-hub --ingest ours,gmqtt --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402

TANDEM = [sys.executable, "-m", "tandem_cli"]
# MQTT clients for the hub's telemetry ingest: name -> "module:Class" with `MqttSubscriber`'s interface.
INGEST_CLIENTS = {
    "ours": "cloud_hub.mqtt_ingest:MqttSubscriber",
    "gmqtt": "benchmarks.gmqtt_ingest:GmqttSubscriber",
}


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
    from models.runtime import load
    from models.serving import ServedModel

    engine = ServedModel("tiny", load(model, use_cache=False))
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
    broker_port: int,
    hub_metrics_url: str,
    creds: list[tuple[str, str, str]],
    seconds: float,
    publisher: str = "raw",
    hub_pid: int = 0,
) -> dict:
    """Blast QoS-0 telemetry from the enrolled devices `creds` and read the hub's ingest counter.

    The rate is the counter's growth over the steady part of the window (from 0.5 s after the first
    message to the end of sending), so neither ramp-up nor the drain afterwards dilutes it; the hub
    process's CPU time over the same window, per message counted, goes beside it. Returns once the
    hub's counter has stopped growing. `sent` far above
    `ingested` means the hub (or the broker, which drops QoS 0 for a slow subscriber) was the limit,
    not the publishers.
    """
    import httpx

    def counted() -> float:
        text = httpx.get(hub_metrics_url, timeout=10).text
        line = next(x for x in text.splitlines() if x.startswith("tandem_telemetry_messages_total"))
        return float(line.split()[-1])

    payload = json.dumps({"load": 0.5, "queue_depth": 1, "power_w": 5.0, "memory_mb": 300.0}).encode()
    before = counted()
    start = time.perf_counter()
    stop_at = start + seconds
    blast = {"raw": _blast_raw, "paho": _blast_paho}[publisher]
    result: dict[str, int] = {}
    sender = threading.Thread(target=lambda: result.update(sent=blast(broker_port, creds, payload, stop_at)))
    sender.start()
    time.sleep(min(0.5, seconds / 4))
    t0, c0, cpu0 = time.perf_counter(), counted(), cpu_seconds(hub_pid)
    sender.join()
    t1, c1, cpu1 = time.perf_counter(), counted(), cpu_seconds(hub_pid)
    # Wait for the broker's backlog to drain into the hub: a hub still busy would take CPU from the
    # next measurement (all hubs and brokers share the cores, and one core with --pin-hub).
    settled = c1
    while True:
        time.sleep(0.5)
        now = counted()
        if now == settled or time.perf_counter() - t1 > 60:
            break
        settled = now
    received = now - before
    return {
        "publishers": len(creds),
        "publisher": publisher,
        "sent": result.get("sent", 0),
        "ingested": received,
        "msgs_per_s": (c1 - c0) / (t1 - t0),
        "hub_cpu_us_per_msg": 1e6 * (cpu1 - cpu0) / max(1.0, c1 - c0),
        "window_s": t1 - t0,
        "send_s": t1 - start,
        "drain_s": time.perf_counter() - t1,
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


def load_client(name: str) -> type:
    """The MQTT client class registered as `name` in INGEST_CLIENTS."""
    module, _, attr = INGEST_CLIENTS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def hub_worker(client: str, argv: list[str]) -> None:
    """Run `tandem <argv>` (the hub) with `client` as its telemetry ingest's MQTT client."""
    import runpy

    from cloud_hub.telemetry import TelemetryIngest

    TelemetryIngest.subscriber_factory = load_client(client)
    sys.argv = [TANDEM[2], *argv]
    runpy.run_module(TANDEM[2], run_name="__main__", alter_sys=True)  # exits with the command's status


class HubProcess:
    """One hub (`tandem hub up`, managed Mosquitto) in its own process, through `hub_worker`."""

    def __init__(self, work: Path, client: str, env: dict, pin: Callable[[], None] | None) -> None:
        self.client, self.data_dir = client, work / "hub"
        self.address, self.http_port = f"127.0.0.1:{free_port()}", free_port()
        self.key_file = work / "key"
        cmd = [sys.executable, __file__, "--hub-worker", client, "hub", "up", "--data-dir", str(self.data_dir)]
        cmd += ["--listen", self.address, "--http-listen", f"127.0.0.1:{self.http_port}"]
        cmd += ["--api-key-file", str(self.key_file)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=pin
        )
        self.output: list[str] = []

    def wait_ready(self) -> None:
        """Until "hub ready"; then its output is drained in a thread (a full pipe would stall the hub)."""
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.output.append(line)
            if "hub ready" in line:
                threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
                return
        raise RuntimeError(f"hub ({self.client}) exited before it was ready:\n{''.join(self.output[-20:])}")

    @property
    def broker_port(self) -> int:
        return int((self.data_dir / "mqtt" / "mosquitto.conf").read_text().split("listener ")[1].split()[0])

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"


def telemetry_rounds(args: argparse.Namespace, hubs: dict[str, HubProcess]) -> dict:
    """Every client's hub measured in turn, `args.rounds` times (order reversed every other round).

    Each hub gets its own enrolled devices once; rates are medians over the rounds, and each ratio to
    the first client is the median of the rounds' own ratios (measured seconds apart).
    """
    names = list(hubs)
    creds = {n: _enroll(hubs[n].data_dir, hubs[n].address, args.publishers) for n in names}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            hub = hubs[name]
            runs[name].append(
                telemetry_rate(
                    hub.broker_port, hub.metrics_url, creds[name], args.seconds, args.publisher, hub.proc.pid
                )
            )
    rates = {n: [run["msgs_per_s"] for run in runs[n]] for n in names}
    out: dict = {"publishers": args.publishers, "publisher": args.publisher, "seconds": args.seconds}
    out |= {"rounds": args.rounds, "cpu": cpu_description()}
    out["clients"] = {
        n: {
            "msgs_per_s": statistics.median(rates[n]),
            "msgs_per_s_range": [min(rates[n]), max(rates[n])],
            "hub_cpu_us_per_msg": statistics.median(run["hub_cpu_us_per_msg"] for run in runs[n]),
            "runs": runs[n],
        }
        for n in names
    }
    for n in names[1:]:
        ratios = [b / a for a, b in zip(rates[names[0]], rates[n], strict=True)]
        out[f"{n}_vs_{names[0]}"] = {"ratio": statistics.median(ratios), "range": [min(ratios), max(ratios)]}
    return out


def cpu_description() -> str:
    """CPU model and vector extensions (figures here depend on the host: AVX2-only Zen 3 or AVX-512 Zen 4)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(x.split(":", 1) for x in info.split("\n\n")[0].splitlines() if ":" in x)
    field = {k.strip(): v.strip() for k, v in fields.items()}.get
    flags = field("flags", "").split()
    vector = sorted(f for f in flags if f.startswith("avx512")) or [f for f in ("avx2",) if f in flags]
    model = f"{field('model name', '?')} (family {field('cpu family', '?')}, model {field('model', '?')})"
    return f"{model}, {os.cpu_count()} cores, {' '.join(vector) or 'no AVX2'}"


def main() -> None:
    if sys.argv[1:2] == ["--hub-worker"]:
        return hub_worker(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--publishers", type=int, default=20)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--publisher", choices=("raw", "paho"), default="raw", help="telemetry publishers (see _blast_raw)")
    p.add_argument(
        "--ingest",
        default="ours",
        help=f"comma-separated MQTT clients for the hub's telemetry ingest, of {sorted(INGEST_CLIENTS)}; "
        "one hub each; the streams run on the first",
    )
    p.add_argument("--rounds", type=int, default=1, help="telemetry rounds (every client once a round)")
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
    clients = args.ingest.split(",")
    if set(clients) - set(INGEST_CLIENTS) or len(set(clients)) != len(clients):
        p.error(f"--ingest {args.ingest}: unknown or repeated clients (known: {', '.join(INGEST_CLIENTS)})")

    work = Path(tempfile.mkdtemp(prefix="tandem-load-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pin = None
    if args.pin_hub:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            sys.exit("--pin-hub needs at least 2 cores")
        os.sched_setaffinity(0, cores[1:])  # this driver, and the agents' process it starts, inherit it
        pin = functools.partial(os.sched_setaffinity, 0, cores[:1])  # the hub's threads and broker inherit it
    hubs = {name: HubProcess(work / name, name, env, pin) for name in clients}
    procs = [h.proc for h in hubs.values()]
    summary: dict = {}
    try:
        for hub in hubs.values():
            hub.wait_ready()
        if not args.telemetry_only:
            summary = _streams(args, hubs[clients[0]], work, env, procs)
        summary["telemetry"] = telemetry_rounds(args, hubs)
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


def _streams(args: argparse.Namespace, hub: HubProcess, work: Path, env: dict, procs: list[subprocess.Popen]) -> dict:
    """Start the agents' process, measure the streams, and stop the agents (telemetry runs without them)."""
    from tests.tiny import TinySpec, write_tiny_gguf

    model = write_tiny_gguf(work / "tiny.gguf", TinySpec(arch="llama", n_layers=2, context_length=256))
    cmd = [sys.executable, __file__, "--agents-worker", str(args.agents), "--hub", hub.address]
    agents = subprocess.Popen([*cmd, "--data-dir", str(hub.data_dir), "--model", str(model)], env=env)
    procs.append(agents)
    key = hub.key_file.read_text().strip()
    try:
        return asyncio.run(_measure(hub.address, key, args, hub.proc.pid))
    finally:
        agents.send_signal(signal.SIGTERM)
        agents.wait(20)


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
    """The streams run fills the `hub_load` block; `--telemetry-only` its own, leaving the streams' figures."""
    if "streams" in summary:
        write_block("hub_load", f"## Hub load\n\nCommand: `{command}`\n\n```json\n{json.dumps(summary, indent=2)}\n```")
    else:
        write_block("hub_telemetry", _telemetry_doc(summary["telemetry"], command))


def _telemetry_doc(t: dict, command: str) -> str:
    """Markdown for the telemetry figures: a table of the clients, the ratios, the JSON."""
    names = list(t["clients"])
    rows = [
        f"| {n} | {c['msgs_per_s']:,.0f} | {c['msgs_per_s_range'][0]:,.0f}-{c['msgs_per_s_range'][1]:,.0f} "
        f"| {c['hub_cpu_us_per_msg']:.1f} |"
        for n, c in t["clients"].items()
    ]
    ratios = []
    for n in names[1:]:
        r = t[f"{n}_vs_{names[0]}"]
        ratios.append(f"{n} / {names[0]}: {r['ratio']:.2f} ({r['range'][0]:.2f}-{r['range'][1]:.2f})")
    setup = (
        f"Machine: {t['cpu']}; {time.strftime('%Y-%m-%d')}. {t['publishers']} {t['publisher']} publishers, QoS 0, "
        f"{t['seconds']:g} s a run; {t['rounds']} rounds of every client in turn (order reversed every other "
        "round), each client in a hub of its own; rates are medians, each ratio the median of the rounds' own."
    )
    table = ["| client | messages/s | range | hub CPU µs a message |", "|---|---|---|---|", *rows]
    lines = ["## Telemetry ingest by MQTT client", "", f"Command: `{command}`  ", setup, "", *table, ""]
    if ratios:
        lines += ["; ".join(ratios) + ".", ""]
    return "\n".join([*lines, "```json", json.dumps(t), "```"])


if __name__ == "__main__":
    main()
