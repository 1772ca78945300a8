"""A split plan's predicted TTFT and time per token against what it measures over a shaped link.

    python benchmarks/split_link.py --json [--write-docs]

A hub serving SmolLM2 at source precision, calibrated as `tandem profile --quick` would (the hub's
own quick pass), and an agent that calibrates itself as `tandem agent run` does and dials the hub
through a link of each setting below. The split is pinned at layer 15 of 30; each setting gets one
request that measures its uplink (split prompts' transfers, cloud_hub.split.measure_uplink), then
`--requests` measured ones of held-out text (~130 tokens in, 24 out). The prediction is the one the
answer carries (the plan from both calibrations, the measured round trip and uplink).

The link is tc netem where the kernel has it; here it says why not and uses an in-process relay that
delays and rate-limits the bytes (benchmarks/linkshim.py). The agent runs in this process (it dials
through the relay): it shares the two cores with the hub, as on a one-machine deployment. Target:
both within 20% of the prediction at every setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402
from benchmarks.linkshim import LinkShim  # noqa: E402

MODEL = "smollm2-135m-instruct"
SETTINGS = [(10.0, 100.0), (40.0, 20.0), (100.0, 5.0)]
"""(round trip ms, rate Mbit/s)."""
TARGET = 0.20


def netem_refusal() -> str:
    """Why tc netem cannot shape a link here ('' when it can)."""
    if shutil.which("tc") is None:
        return "tc (iproute2) is not installed"
    done = subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        return f"the kernel refuses netem ({done.stderr.strip() or done.returncode})"
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    return ""


async def measure(requests: int, warmup: int) -> list[dict]:
    from cloud_hub.placements import pinned_split
    from cloud_hub.router import split_estimate
    from cloud_hub.server import Hub, HubConfig
    from device_profiles import load_profile
    from edge_agent.agent import Agent, AgentConfig
    from edge_agent.calibrate import agent_calibration
    from models.corpus import documents
    from models.runtime import load
    from models.serving import ServedModel
    from tandem import AsyncClient

    text = next(d.text for d in documents("eval", limit=20) if len(d.text) > 2000)[:600]
    work = Path(tempfile.mkdtemp(prefix="split-link-"))
    hub = Hub(HubConfig(data_dir=work / "hub", listen="127.0.0.1:0", cloud_model=MODEL, mqtt="none", ping_every_s=0.3))
    await hub.start()
    rows = []
    try:
        assert hub.service is not None and hub.registry is not None
        served = hub.service.cloud.served  # type: ignore[union-attr]
        cal, _ = await asyncio.to_thread(
            agent_calibration, served, MODEL, "source", "cpu", load_profile("cloud-cpu-2core")
        )
        hub.fleet.calibrations.set_calibration("cloud", MODEL, cal)
        shim = LinkShim(hub.port, *SETTINGS[0])
        mine = ServedModel(MODEL, load(MODEL, quant="source"))
        agent_cal, _ = await asyncio.to_thread(
            agent_calibration, mine, MODEL, "source", "cpu", load_profile("cpu-2core")
        )
        mine.info["calibration_json"] = agent_cal.to_json()
        config = AgentConfig(hub=f"127.0.0.1:{shim.port}", profile="cpu-2core", state_dir=work / "agent",
                             name="shaped", token=hub.registry.create_token())  # fmt: skip
        agent, stop = Agent(config, mine), asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        while not hub.fleet.online():
            await asyncio.sleep(0.05)
        session = hub.fleet.online()[0]
        key = hub.registry.create_api_key("bench")
        async with AsyncClient(hub.address, api_key=key) as client:
            for rtt, rate in SETTINGS:
                shim.set(rtt, rate)
                session.rtt_ms = session.uplink_mbps = None  # measure this link afresh
                while session.rtt_ms is None:
                    await asyncio.sleep(0.05)
                pin = f"split:{session.device_id}:15"
                await client.generate(text, model=MODEL, max_tokens=8, device=pin)  # measures the uplink
                for _ in range(warmup):  # the pipeline's corrections see the new link
                    await client.generate(text, model=MODEL, max_tokens=24, device=pin)
                got = [await client.generate(text, model=MODEL, max_tokens=24, device=pin) for _ in range(requests)]
                p = [r.placements[0] for r in got]
                pairs = list(zip(got, p, strict=True))
                # the plan alone, as the calibrations and the measured link predict it, no online correction
                c = pinned_split(hub.fleet, hub.service.cloud, hub.service.placements.source("cloud").profile,
                                 pin, MODEL)  # fmt: skip
                raw = [split_estimate(c.split, c.cost, r.prompt_tokens, 24) for r in got]
                rows.append({
                    "raw_ttft_ms": statistics.median(e.ttft_ms for e in raw),
                    "raw_tpot_ms": statistics.median(e.tpot_ms for e in raw),
                    "raw_ttft_ratio": statistics.median(r.ttft_ms / e.ttft_ms for r, e in zip(got, raw, strict=True)),
                    "raw_tpot_ratio": statistics.median(r.tpot_ms / e.tpot_ms for r, e in zip(got, raw, strict=True)),
                    "rtt_ms": rtt, "rate_mbps": rate,
                    "ttft_ms": statistics.median(r.ttft_ms for r in got),
                    "predicted_ttft_ms": statistics.median(x.predicted_ttft_ms for x in p),
                    "tpot_ms": statistics.median(r.tpot_ms for r in got),
                    "predicted_tpot_ms": statistics.median(x.predicted_tpot_ms for x in p),
                    "ttft_ratio": statistics.median(r.ttft_ms / x.predicted_ttft_ms for r, x in pairs),
                    "tpot_ratio": statistics.median(r.tpot_ms / x.predicted_tpot_ms for r, x in pairs),
                    "measured_rtt_ms": session.rtt_ms, "measured_uplink_mbps": session.uplink_mbps,
                })  # fmt: skip
        stop.set()
        await asyncio.wait_for(task, 10)
        shim.close()
    finally:
        await hub.stop(grace=0.5)
    return rows


def summary(rows: list[dict], link: str) -> dict:
    def worst(prefix: str) -> float:
        return max(max(abs(r[f"{prefix}ttft_ratio"] - 1), abs(r[f"{prefix}tpot_ratio"] - 1)) for r in rows)

    return {
        "benchmark": "split_link", "link": link, "target": TARGET,
        "ttft_ratios": [round(r["ttft_ratio"], 3) for r in rows],
        "tpot_ratios": [round(r["tpot_ratio"], 3) for r in rows],
        "worst_error": round(worst(""), 3), "target_met": worst("") <= TARGET,
        "plan_ttft_ratios": [round(r["raw_ttft_ratio"], 3) for r in rows],
        "plan_tpot_ratios": [round(r["raw_tpot_ratio"], 3) for r in rows],
        "plan_worst_error": round(worst("raw_"), 3),
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    head = ("| round trip / rate | TTFT measured | predicted | ratio | plan alone (ratio) | per token measured "
            "| predicted | ratio | plan alone (ratio) | measured round trip | measured uplink |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [
        f"| {r['rtt_ms']:g} ms / {r['rate_mbps']:g} Mbit/s | {r['ttft_ms']:.0f} ms | {r['predicted_ttft_ms']:.0f} ms "
        f"| {r['ttft_ratio']:.2f} | {r['raw_ttft_ms']:.0f} ms ({r['raw_ttft_ratio']:.2f}) | {r['tpot_ms']:.1f} ms "
        f"| {r['predicted_tpot_ms']:.1f} ms | {r['tpot_ratio']:.2f} | {r['raw_tpot_ms']:.1f} ms "
        f"({r['raw_tpot_ratio']:.2f}) | {r['measured_rtt_ms']:.1f} ms | {r['measured_uplink_mbps']:.1f} Mbit/s |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5, help="measured requests per link setting")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per link setting after the first")
    p.add_argument("--json", action="store_true", help="print one JSON line of headline figures")
    p.add_argument("--write-docs", action="store_true", help="update this benchmark's section of docs/benchmarks.md")
    args = p.parse_args()
    refusal = netem_refusal()
    link = "tc netem" if not refusal else f"in-process relay ({refusal})"
    if refusal:
        print(f"{refusal}: the in-process link relay (delay and rate) stands in for netem", file=sys.stderr)
    rows = asyncio.run(measure(args.requests, args.warmup))
    head = summary(rows, link)
    print(json.dumps(head) if args.json else table(rows))
    if args.write_docs:
        from edge_agent.profiler import cpu_name

        body = (
            "## A split's prediction under a shaped link (issue 16)\n\n"
            f"Command: `{command_line()}`  \nMachine: {cpu_name()}, 2 cores. Link: {link}. SmolLM2 at source "
            "precision split at layer 15 of 30 (pinned), both sides calibrated by their quick pass, the round trip "
            "from the work channel's pings and the uplink from split prompts' transfers. Medians of "
            f"{args.requests} requests a setting (~130 prompt tokens of held-out text, 24 new). Target: within "
            f"{TARGET:.0%} of the prediction.\n\n{table(rows)}\n\n```json\n{json.dumps(head)}\n```\n"
        )
        write_block("split_link", body)


if __name__ == "__main__":
    main()
