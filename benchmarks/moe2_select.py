"""MoE² selection (issue 17): the exact branch and bound against brute force, on this machine's CPU.

The fleet is synthetic but shaped like ours: the issue's variants (SmolLM2-135M fp32/int8/int4/
pruned-4/pruned-8, SmolLM2-360M int8, Gemma 3 270M int8/int4) on eight edge devices, plus one cloud
expert. A variant's per-request loss (bits per byte) is its base quality + the request's difficulty
+ its model's specialisation (which the gate sees) + noise (which it does not); the same variant on
two devices has the same losses. The gate is a softmax of what it sees, so it is good but not
perfect (the objective is not monotone). Latency and energy follow the device and the variant.

- 16 experts: `select` and `brute_force` on the same problems (k = 1, 2; a loose and a tight
  budget), and the ratio of their times (target >= 10x);
- 64 experts (no brute force): `select`'s median time (target < 50 ms) and its objective against
  the greedy baseline's.

    python benchmarks/moe2_select.py --json                # one JSON line
    python benchmarks/moe2_select.py --json --write-docs   # and its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402
from partitioner.moe2.baselines import Greedy  # noqa: E402
from partitioner.moe2.experts import Budget, Expert, Problem  # noqa: E402
from partitioner.moe2.objective import GatedObjective  # noqa: E402
from partitioner.moe2.select import brute_force, select  # noqa: E402

TARGETS = {"ratio_16": 10.0, "ms_64": 50.0}
VARIANTS = (  # model, variant, tokenizer, base bits per byte, relative latency
    ("smollm2-135m", "fp32", "smollm2", 1.00, 1.0),
    ("smollm2-135m", "int8", "smollm2", 1.01, 0.5),
    ("smollm2-135m", "int4", "smollm2", 1.05, 0.3),
    ("smollm2-135m", "pruned-4", "smollm2", 1.10, 0.85),
    ("smollm2-135m", "pruned-8", "smollm2", 1.22, 0.7),
    ("gemma3-270m", "int8", "gemma3", 0.95, 1.1),
    ("gemma3-270m", "int4", "gemma3", 0.98, 0.6),
    ("smollm2-360m", "int8", "smollm2", 0.90, 1.4),
)
DEVICES = (  # name, ms per request of the fp32 135M model, active watts
    ("pi5", 300, 4.0), ("nano", 120, 7.0), ("agx", 60, 15.0), ("rtx", 15, 120.0),
    ("cpu", 400, 10.0), ("nano2", 140, 7.0), ("pi5b", 320, 4.0), ("agx2", 65, 15.0),
)  # fmt: skip
BUDGETS = {"loose": (None, None), "tight": (1.5, 400.0)}
"""(energy_j, latency_ms) per budget name."""


def fleet(n_experts: int, n_requests: int, seed: int) -> Problem:
    """n_experts - 1 (variant, device) edge experts drawn without replacement, and the cloud."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 0.15, n_requests)
    seen = {m: rng.normal(0, 0.06, n_requests) for m, *_ in VARIANTS}
    unseen = {m: rng.normal(0, 0.04, n_requests) for m, *_ in VARIANTS}
    loss = {v[:2]: v[3] + difficulty + seen[v[0]] + unseen[v[0]] + rng.normal(0, 0.015, n_requests) for v in VARIANTS}
    gate = {v[:2]: -(v[3] + seen[v[0]] + rng.normal(0, 0.01, n_requests)) for v in VARIANTS}
    pairs = [(v, d) for d in DEVICES for v in VARIANTS]
    experts, losses, logits = [], [], []
    for i in rng.permutation(len(pairs))[: n_experts - 1]:
        (model, variant, tok, _, speed), (dev, ms, watts) = pairs[i]
        lat = ms * speed * rng.uniform(0.9, 1.1)
        q = float(loss[model, variant].mean())
        experts.append(Expert(f"{dev}/{model}/{variant}", dev, model, variant, tok, "edge", lat, watts * lat / 1e3, q))
        losses.append(loss[model, variant])
        logits.append(gate[model, variant])
    cloud = 0.82 + difficulty + rng.normal(0, 0.05, n_requests)
    experts.append(
        Expert("cloud/llama-8b", "cloud", "llama-8b", "bf16", "llama", "cloud", 450.0, 0.0, float(cloud.mean()))
    )
    losses.append(cloud)
    logits.append(-(0.82 + rng.normal(0, 0.03, n_requests)))
    z = 12 * np.stack(logits, axis=1)
    w = np.exp(z - z.max(axis=1, keepdims=True))
    objective = GatedObjective(
        w / w.sum(axis=1, keepdims=True), np.stack(losses, axis=1), tuple(e.tokenizer for e in experts)
    )
    return Problem(tuple(experts), objective)


def timed(call, repeats: int) -> tuple[float, object]:
    """Median ms of `repeats` calls, and the result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), out


def run(n_requests: int, seeds: int, repeats: int) -> list[dict]:
    rows = []
    for n, ks in ((16, (1, 2)), (64, (1,))):  # k = 2 at 64: 10-80 ms per solve (2026-12-07), not timed here
        for seed in range(seeds):
            problem = fleet(n, n_requests, seed)
            for k in ks:
                for name, (energy, latency) in BUDGETS.items():
                    budget = Budget(energy, latency, k)
                    ms, sel = timed(lambda p=problem, b=budget: select(p, b), repeats)
                    row = {"experts": n, "seed": seed, "k": k, "budget": name, "select_ms": ms,
                           "evaluated": sel.evaluated, "objective": sel.objective}  # fmt: skip
                    if n == 16:
                        bf_ms, ref = timed(lambda p=problem, b=budget: brute_force(p, b), 1)
                        assert ref.subset == sel.subset and ref.objective == sel.objective, (ref, sel)
                        row |= {"brute_ms": bf_ms, "brute_evaluated": ref.evaluated, "ratio": bf_ms / ms}
                    else:
                        row["greedy_objective"] = Greedy().choose(problem, budget).objective
                    rows.append(row)
                    print(f"# {row}", file=sys.stderr, flush=True)
    return rows


def headline(rows: list[dict], n_requests: int, seeds: int) -> dict:
    small = [r for r in rows if r["experts"] == 16]
    big = [r for r in rows if r["experts"] == 64]
    ratio = sum(r["brute_ms"] for r in small) / sum(r["select_ms"] for r in small)
    per_k = {k: max(r["select_ms"] for r in big if r["k"] == k) for k in sorted({r["k"] for r in big})}
    return {
        "benchmark": "moe2_select",
        "ratio_16": round(ratio, 1),
        "ratio_16_min": round(min(r["ratio"] for r in small), 1),
        "ms_64_median": round(statistics.median(r["select_ms"] for r in big), 2),
        "ms_64_max_by_k": {str(k): round(v, 1) for k, v in per_k.items()},
        "objective_64_vs_greedy_bpb": round(statistics.mean(r["greedy_objective"] - r["objective"] for r in big), 4),
        "targets": TARGETS,
        "ratio_target_met": ratio >= TARGETS["ratio_16"],
        "ms_64_target_met": max(r["select_ms"] for r in big) < TARGETS["ms_64"],
        "requests": n_requests,
        "seeds": seeds,
    }


def table(rows: list[dict]) -> str:
    out = ["| experts | seed | k | budget | select ms | evaluated | brute ms (evaluated) | ratio | BPB | greedy BPB |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        brute = f"{r['brute_ms']:.0f} ({r['brute_evaluated']})" if "brute_ms" in r else "-"
        ratio = f"{r['ratio']:.0f}x" if "ratio" in r else "-"
        greedy = f"{r['greedy_objective']:.4f}" if "greedy_objective" in r else "-"
        out.append(f"| {r['experts']} | {r['seed']} | {r['k']} | {r['budget']} | {r['select_ms']:.1f} | "
                   f"{r['evaluated']} | {brute} | {ratio} | {r['objective']:.4f} | {greedy} |")  # fmt: skip
    return "\n".join(out)


def write_docs(rows: list[dict], summary: dict) -> None:
    from edge_agent.measurements import cpu_name  # imports torch (~3 s): only when writing the docs

    budgets = "; ".join(f"{k}: energy {e} J, latency {lat} ms" for k, (e, lat) in BUDGETS.items())
    body = (
        "## MoE² selection (issue 17)\n\n"
        f"Command: `{command_line()}`  \nMachine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores "
        f"(shared with other jobs while it ran); Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}. "
        f"Synthetic fleet (benchmarks/moe2_select.py: the issue's variants on eight edge devices and the cloud), "
        f"{summary['requests']} calibration requests, seeds 0..{summary['seeds'] - 1}; budgets {budgets}. "
        f"select's time is the median of its repeats; brute force runs once. Targets: >= "
        f"{TARGETS['ratio_16']:g}x brute force at 16 experts ({'met' if summary['ratio_target_met'] else 'NOT met'}), "
        f"< {TARGETS['ms_64']:g} ms at 64 ({'met' if summary['ms_64_target_met'] else 'NOT met'}, slowest row). "
        "At 64 experts select searches variants rather than experts: one variant's experts on several devices "
        "are twins (the same gate and loss columns, as the hub's ExpertTable gives them), and select takes a twin "
        "only with its twins of smaller id; a greedy incumbent lets the bound cut from the first node (select.py). "
        "A gate column per expert (no twins) leaves the bound alone to cut: slower.\n\n"
        + table(rows)
        + f"\n\n```json\n{json.dumps(summary)}\n```"
    )
    write_block("moe2_select", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=128, help="calibration requests per problem")
    p.add_argument("--seeds", type=int, default=2, help="fleets per size")
    p.add_argument("--repeats", type=int, default=3, help="select calls timed per row (median)")
    p.add_argument("--json", action="store_true", help="print one JSON line of headline figures")
    p.add_argument("--write-docs", action="store_true", help="update this benchmark's section of docs/benchmarks.md")
    args = p.parse_args()
    rows = run(args.requests, args.seeds, args.repeats)
    summary = headline(rows, args.requests, args.seeds)
    print(json.dumps(summary) if args.json else table(rows))
    if args.write_docs:
        write_docs(rows, summary)


if __name__ == "__main__":
    main()
