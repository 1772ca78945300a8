"""Split solvers (issue 16): how long partitioner.split takes to plan, on this machine's CPU.

- the single cut over 30 layers (SmolLM2-135M at fp16: a Jetson Orin Nano and an H100 over the
  Jetson's own link), each objective (ttft_ms, tpot_ms, energy_j) with a budget on the others;
- the pipeline DP over a chain of 8 devices and the same 30 layers (Raspberry Pi 5, Jetson Orin
  Nano, 2-core CPU, Jetson AGX Orin, RTX 4090 desktop, a second Orin Nano, the hub's 2-core CPU,
  the H100; Wi-Fi, LAN and WAN links between them), for latency (ttft_ms, tpot_ms) and throughput
  (bottleneck_ms).

Each figure is the median of `--repeats` calls in one process (every call plans from scratch:
nothing is cached between calls); the headline for a solver is its slowest objective.
Targets: single cut < 1 ms, DP < 100 ms.

    python benchmarks/split_solvers.py                       # table
    python benchmarks/split_solvers.py --json                # one JSON line
    python benchmarks/split_solvers.py --json --write-docs   # and its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402
from device_profiles import LinkSpec, load_profile  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from partitioner.cost import ModelCost  # noqa: E402
from partitioner.split import Plan, pipeline, single_cut  # noqa: E402

TARGETS = {"single_cut_ms": 1.0, "dp_ms": 100.0}
SMOLLM2 = ModelConfig(
    arch="llama", n_layers=30, dim=576, ffn_dim=1536, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152,
    context_length=8192, norm_eps=1e-5, rope_base=100000.0, rope_local_base=100000.0, tied_embeddings=True,
)  # fmt: skip
PROMPT, NEW = 512, 128
WIFI, LAN, WAN = LinkSpec(5, 100, 100), LinkSpec(1, 1000, 1000), LinkSpec(30, 50, 200)
CHAIN = (
    ("pi", "raspberry-pi-5", WIFI),
    ("nano", "jetson-orin-nano", LAN),
    ("cpu", "cpu-2core", LAN),
    ("agx", "jetson-agx-orin", LAN),
    ("rtx", "rtx-4090-desktop", WIFI),
    ("nano2", "jetson-orin-nano", WAN),
    ("hubcpu", "cloud-cpu-2core", LAN),
    ("h100", "cloud-h100", None),
)
"""(name, profile, link to the next device): the chain the DP plans over."""


def timed(call: Callable[[], Plan], repeats: int) -> tuple[float, Plan]:
    """Median ms of `repeats` calls, and the plan."""
    plan, times = call(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), plan


def run(repeats: int) -> list[dict]:
    """One row per (solver, objective): median ms and what it planned."""
    cost = ModelCost.from_config(SMOLLM2, bits_per_weight=16)
    edge, cloud = load_profile("jetson-orin-nano"), load_profile("cloud-h100")
    devices = [(name, load_profile(profile)) for name, profile, _ in CHAIN]
    links = [link for _, _, link in CHAIN[:-1]]
    budgets = {"ttft_ms": 500.0, "tpot_ms": 50.0, "energy_j": 20.0}
    rows = []
    for objective in ("ttft_ms", "tpot_ms", "energy_j"):
        others = {k: v for k, v in budgets.items() if k != objective}
        ms, plan = timed(lambda o=objective, b=others: single_cut(edge, cloud, cost, PROMPT, NEW, objective=o, **b),
                         repeats)  # fmt: skip
        rows.append({"solver": "single_cut", "size": "2 devices x 30 layers", "objective": objective, "ms": ms,
                     "plan": plan})  # fmt: skip
    for objective in ("ttft_ms", "tpot_ms", "bottleneck_ms"):
        ms, plan = timed(
            lambda o=objective: pipeline(devices, links, cost, PROMPT, NEW, objective=o), max(1, repeats // 10)
        )
        rows.append({"solver": "pipeline", "size": "8 devices x 30 layers", "objective": objective, "ms": ms,
                     "plan": plan})  # fmt: skip
    return rows


def headline(rows: list[dict], repeats: int) -> dict:
    def worst(solver: str, objectives: tuple[str, ...]) -> float:
        return max(r["ms"] for r in rows if r["solver"] == solver and r["objective"] in objectives)

    single = worst("single_cut", ("ttft_ms", "tpot_ms", "energy_j"))
    latency = worst("pipeline", ("ttft_ms", "tpot_ms"))
    throughput = worst("pipeline", ("bottleneck_ms",))
    return {
        "benchmark": "split_solvers",
        "single_cut_ms": round(single, 4),
        "dp_latency_ms": round(latency, 3),
        "dp_throughput_ms": round(throughput, 3),
        "targets": TARGETS,
        "single_cut_target_met": single < TARGETS["single_cut_ms"],
        "dp_target_met": max(latency, throughput) < TARGETS["dp_ms"],
        "repeats": repeats,
    }


def describe(plan: Plan) -> str:
    stages = ", ".join(f"{s.device} [{s.start}, {s.end})" for s in plan.stages)
    figures = f"TTFT {plan.ttft_ms:.1f} ms, {plan.tpot_ms:.2f} ms/token, bottleneck {plan.bottleneck_ms:.2f} ms"
    return f"{stages}; {figures}, edge {plan.edge_energy_j:.2f} J"


def table(rows: list[dict]) -> str:
    out = ["| solver | size | objective | median ms | plan |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['solver']} | {r['size']} | {r['objective']} | {r['ms']:.4f} | {describe(r['plan'])} |")
    return "\n".join(out)


def write_docs(rows: list[dict], summary: dict) -> None:
    from edge_agent.measurements import cpu_name  # imports torch (~3 s): only when writing the docs

    met = "met" if summary["single_cut_target_met"] and summary["dp_target_met"] else "NOT met"
    chain = ", ".join(f"{name} ({profile})" for name, profile, _ in CHAIN)
    body = (
        "## Split solvers (issue 16)\n\n"
        f"Command: `{command_line()}`  \nMachine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}. SmolLM2-135M at fp16 (30 layers), a "
        f"{PROMPT}-token prompt and {NEW} new tokens. Single cut: jetson-orin-nano and cloud-h100 over the Jetson's "
        f"link, each objective with budgets on the other two. DP: the chain {chain}. Median of {summary['repeats']} "
        f"calls (the DP: of {max(1, summary['repeats'] // 10)}), each planning from scratch. Targets (single cut < "
        f"{TARGETS['single_cut_ms']:g} ms, DP < {TARGETS['dp_ms']:g} ms): {met}.\n\n"
        + table(rows)
        + f"\n\n```json\n{json.dumps(summary)}\n```"
    )
    write_block("split_solvers", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200, help="calls timed per single-cut objective (the DP: a tenth)")
    p.add_argument("--json", action="store_true", help="print one JSON line of headline figures")
    p.add_argument("--write-docs", action="store_true", help="update this benchmark's section of docs/benchmarks.md")
    args = p.parse_args()
    rows = run(args.repeats)
    summary = headline(rows, args.repeats)
    print(json.dumps(summary) if args.json else table(rows))
    if args.write_docs:
        write_docs(rows, summary)


if __name__ == "__main__":
    main()
