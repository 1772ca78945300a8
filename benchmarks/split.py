"""Split pays? (issue 16): when does cutting a model between an edge device and the cloud beat running
it whole on one of them, by the cost model's predictions (partitioner.split; nothing is measured).

Over every shipped link profile, every (edge, cloud) pair of shipped device profiles, SmolLM2-135M and
Gemma 3 270M (their sizes as an agent serves them, from the GGUF header: tandem_cli.partition.model_card)
and two request sizes, each scenario below is solved twice: the best real split (0 < k < N,
single_cut(interior=True)) and the better of edge-only (k = N) and cloud-only (k = 0), each within
the scenario's budgets and both devices' memory. A split wins when it is strictly better; its gain is
best end / best split (> 1). Scenarios:

- each objective alone: ttft_ms, tpot_ms, energy_j (edge energy; cloud-only spends none);
- the trade-offs: energy_j with TTFT at most the midpoint of the two ends' TTFTs; ttft_ms and
  tpot_ms with edge energy at most half of edge-only's.

    python benchmarks/split.py                       # tables
    python benchmarks/split.py --json                # one JSON line of headline figures
    python benchmarks/split.py --json --write-docs   # and its section of docs/benchmarks.md, and the plot
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402
from device_profiles import DeviceProfile, LinkSpec, all_profiles  # noqa: E402
from device_profiles.links import all_links  # noqa: E402
from models.errors import ModelNotPulled  # noqa: E402
from partitioner.cost import ModelCost  # noqa: E402
from partitioner.split import Plan, PlanError, evaluate, single_cut  # noqa: E402
from tandem_cli.partition import every_cut, fits_memory, model_card, over_budget, plot_front  # noqa: E402

MODELS = {"SmolLM2-135M": "smollm2-135m-instruct", "Gemma 3 270M": "gemma3-270m"}
"""Label -> zoo name."""
SIZES = ((128, 64), (1024, 256))
"""(prompt tokens, new tokens)."""
PLOT = ROOT / "docs" / "data" / "split_pareto.png"
VALUE = {"ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms", "energy_j": "edge_energy_j"}
"""Objective -> the Plan field it reads."""


@dataclass(frozen=True)
class Case:
    """One model, request size, device pair and link."""

    model: str
    cost: ModelCost
    prompt: int
    new: int
    edge: DeviceProfile
    cloud: DeviceProfile
    link_name: str
    link: LinkSpec


Budget = Callable[[Plan, Plan], dict[str, float]]
"""(edge-only, cloud-only) -> the scenario's budgets."""
SCENARIOS: dict[str, tuple[str, Budget]] = {
    "ttft_ms": ("ttft_ms", lambda e, c: {}),
    "tpot_ms": ("tpot_ms", lambda e, c: {}),
    "energy_j": ("energy_j", lambda e, c: {}),
    "energy_j, TTFT <= midpoint": ("energy_j", lambda e, c: {"ttft_ms": (e.ttft_ms + c.ttft_ms) / 2}),
    "ttft_ms, energy <= edge-only/2": ("ttft_ms", lambda e, c: {"energy_j": e.edge_energy_j / 2}),
    "tpot_ms, energy <= edge-only/2": ("tpot_ms", lambda e, c: {"energy_j": e.edge_energy_j / 2}),
}
"""Scenario -> (objective, its budgets from the two ends' figures)."""


def value(plan: Plan, objective: str) -> float:
    return getattr(plan, VALUE[objective])


def solve(case: Case, scenario: str) -> dict:
    """The best split and the better end of `case` under `scenario`, and who wins by how much."""
    objective, rule = SCENARIOS[scenario]
    chain, n = [("edge", case.edge), ("cloud", case.cloud)], case.cost.n_layers
    ends = {k: evaluate(chain, [case.link], case.cost, case.prompt, case.new, (k,)) for k in (n, 0)}
    budgets = rule(ends[n], ends[0])
    ok = [(p, k) for k, p in ends.items() if _feasible(p, budgets)]
    end = min(ok, key=lambda pk: (value(pk[0], objective), pk[1]), default=None)
    try:
        split = single_cut(case.edge, case.cloud, case.cost, case.prompt, case.new, objective=objective,  # type: ignore[arg-type]
                           link=case.link, interior=True, **budgets)  # fmt: skip
    except PlanError:
        split = None
    s = value(split, objective) if split else math.inf
    e = value(end[0], objective) if end else math.inf
    wins = split is not None and s < e * (1 - 1e-9)
    gain = (e / s if s else math.inf) if split else 0.0
    return {"scenario": scenario, "case": case, "budgets": budgets, "split": split, "end": end, "ends": ends,
            "wins": wins, "gain": gain}  # fmt: skip


def cases() -> tuple[list[Case], list[str]]:
    """Every case, and the models skipped (not pulled)."""
    profiles = all_profiles().values()
    edges = [p for p in profiles if p.kind == "edge"]
    clouds = [p for p in profiles if p.kind == "cloud"]
    out, skipped = [], []
    for label, name in MODELS.items():
        try:
            cost = model_card(name).cost()
        except ModelNotPulled:
            skipped.append(f"{label} (not pulled: tandem models pull {name})")
            continue
        for (prompt, new), edge, cloud, (lname, link) in itertools.product(SIZES, edges, clouds, all_links().items()):
            out.append(Case(label, cost, prompt, new, edge, cloud, lname, link.spec))
    return out, skipped


def summarise(rows: list[dict]) -> dict:
    """Per scenario: cases, split wins, their share, the median and max gain of the wins where an end
    fits too, and how many wins are a split being the only plan that fits."""
    out = {}
    for scenario in SCENARIOS:
        mine = [r for r in rows if r["scenario"] == scenario]
        wins = [r for r in mine if r["wins"]]
        gains = [r["gain"] for r in wins if math.isfinite(r["gain"])]
        out[scenario] = {
            "cases": len(mine),
            "split_wins": len(wins),
            "share": round(len(wins) / len(mine), 4) if mine else 0.0,
            "median_gain": round(statistics.median(gains), 3) if gains else None,
            "max_gain": round(max(gains), 3) if gains else None,
            "only_split_fits": len(wins) - len(gains),
        }
    return out


def by_cloud(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Split wins per scenario and cloud profile: where the cloud is slower per layer than the edge."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        if r["wins"]:
            cell = out.setdefault(r["scenario"], {})
            cell[r["case"].cloud.name] = cell.get(r["case"].cloud.name, 0) + 1
    return out


def representative(rows: list[dict]) -> list[dict]:
    """Per scenario: the case where a split gains most (a win if there is one, else the closest miss),
    and the median case by gain."""
    out = []
    for scenario in SCENARIOS:
        mine = sorted((r for r in rows if r["scenario"] == scenario), key=lambda r: r["gain"])
        out += [mine[-1], mine[len(mine) // 2]]
    return out


def _fmt(plan: Plan | None, objective: str) -> str:
    if plan is None:
        return "none fits"
    v = value(plan, objective)
    return f"{v:.3g} J" if objective == "energy_j" else f"{v:.4g} ms"


def _verdict(r: dict) -> str:
    if r["wins"]:
        return f"**split x{r['gain']:.2f}**" if math.isfinite(r["gain"]) else "**only a split fits**"
    if r["end"] is None:
        return "nothing fits"
    end = "edge-only" if r["end"][1] else "cloud-only"
    if not r["split"]:
        return f"{end} (no split fits)"
    return f"{end} (split {1 / r['gain']:.4g}x worse)" if r["gain"] else f"{end} (0 J at the edge)"


def _feasible(plan: Plan, budgets: dict[str, float]) -> bool:
    return fits_memory(plan) and not over_budget(plan, budgets)


def table(rows: list[dict]) -> str:
    out = ["| scenario | model | prompt/new | edge | cloud | link | budget | best split | edge-only | cloud-only | "
           "winner (split gain: best end / best split) |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c, objective = r["case"], SCENARIOS[r["scenario"]][0]
        n = c.cost.n_layers
        budget = ", ".join(f"{b} <= {v:.3g}" for b, v in r["budgets"].items()) or "-"
        split = f"k={r['split'].cuts[0]}/{n}: {_fmt(r['split'], objective)}" if r["split"] else "none fits"
        ends = [_fmt(p, objective) + ("" if _feasible(p, r["budgets"]) else "*") for p in (r["ends"][n], r["ends"][0])]
        out.append(f"| {r['scenario']} | {c.model} | {c.prompt}/{c.new} | {c.edge.name} | {c.cloud.name} | "
                   f"{c.link_name} | {budget} | {split} | {ends[0]} | {ends[1]} | {_verdict(r)} |")  # fmt: skip
    return "\n".join(out)


def summary_table(summary: dict, clouds: dict[str, dict[str, int]]) -> str:
    out = [
        "| scenario | cases | split wins | median gain | max gain | wins by cloud profile |",
        "|---|---|---|---|---|---|",
    ]
    for scenario, s in summary.items():
        where = ", ".join(f"{k} {v}" for k, v in sorted(clouds.get(scenario, {}).items())) or "-"
        med, top = (f"x{s[k]:.2f}" if s[k] else "-" for k in ("median_gain", "max_gain"))
        out.append(f"| {scenario} | {s['cases']} | {s['split_wins']} ({s['share']:.1%}) | {med} | {top} | {where} |")
    return "\n".join(out)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def pareto_case(rows: list[dict]) -> dict:
    """The SmolLM2 case (any model's, if SmolLM2 was skipped) where a split saves the most edge energy
    within the TTFT budget: the one the plot shows."""
    mine = [r for r in rows if r["scenario"] == "energy_j, TTFT <= midpoint" and r["end"] is not None]
    r = max(mine, key=lambda r: (r["case"].model == "SmolLM2-135M", math.isfinite(r["gain"]), r["gain"]))
    c, chosen = r["case"], r["split"] if r["wins"] else r["end"][0]
    return {"model": c.model, "prompt": c.prompt, "new": c.new, "edge": c.edge.name, "cloud": c.cloud.name,
            "link": c.link_name, "ttft_budget_ms": round(r["budgets"]["ttft_ms"], 2), "k": chosen.cuts[0],
            "n_layers": c.cost.n_layers, "gain": round(r["gain"], 3), "row": r, "chosen": chosen}  # fmt: skip


def plot_case(case: dict, path: Path) -> None:
    """Every cut of `case` (pareto_case), the chosen plan marked: tandem_cli.partition.plot_front."""
    r = case["row"]
    c = r["case"]
    cuts = every_cut(c.edge, c.cloud, c.link, c.cost, c.prompt, c.new, "fp16")
    title = (f"{c.model}, {c.prompt}/{c.new} tokens: {c.edge.name} - {c.link_name} - {c.cloud.name}; least edge energy "
             f"with TTFT <= {r['budgets']['ttft_ms']:.0f} ms (the cost model's predictions)")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_front(cuts, case["chosen"], path, title, r["budgets"])


def headline(summary: dict, n_cases: int, skipped: list[str], seconds: float) -> dict:
    return {
        "benchmark": "split",
        "cases": n_cases,
        "split_wins": {s: v["split_wins"] for s, v in summary.items()},
        "median_gain": {s: v["median_gain"] for s, v in summary.items() if v["median_gain"]},
        "max_gain": {s: v["max_gain"] for s, v in summary.items() if v["max_gain"]},
        "skipped": skipped,
        "seconds": round(seconds, 2),
    }


def write_docs(summary: dict, rows: list[dict], head: dict, plotted: dict) -> None:
    from edge_agent.measurements import cpu_name  # imports torch (~3 s): only when writing the docs

    edges = sorted({r["case"].edge.name for r in rows})
    clouds = sorted({r["case"].cloud.name for r in rows})
    links = sorted({r["case"].link_name for r in rows})
    models = sorted({r["case"].model for r in rows})
    body = (
        "## Split pays? Single cut vs edge-only and cloud-only (issue 16)\n\n"
        "**These are the cost model's predictions (partitioner.split over the device and link profiles), not "
        "measurements.**  \n"
        f"Command: `{command_line()}`  \nMachine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}; {head['seconds']:.1f} s for "
        f"{head['cases']} cases x {len(SCENARIOS)} scenarios.  \n"
        f"Models: {', '.join(models)} (sizes as an agent serves them at source precision). Requests (prompt/new "
        f"tokens): {', '.join(f'{p}/{n}' for p, n in SIZES)}. Edges: {', '.join(edges)}. Clouds: {', '.join(clouds)}. "
        f"Links: {', '.join(links)}. fp16 hidden states on the wire.\n\n"
        "Each scenario is solved twice, within its budgets and both devices' memory: the best real split "
        "(0 < k < N) and the better of edge-only and cloud-only. A split wins when strictly better; its gain is "
        "best end / best split.\n\n"
        + summary_table(summary, by_cloud(rows))
        + "\n\nRepresentative cases: per scenario, the one where a split gains most and the median one (* marks an "
        "end outside the budget).\n\n"
        + table(representative(rows))
        + f"\n\nThe front of every cut for {plotted['model']} on {plotted['edge']} - {plotted['link']} - "
        f"{plotted['cloud']}, {plotted['prompt']}/{plotted['new']} tokens (the case where a split saves the most "
        f"edge energy within the TTFT budget, k = {plotted['k']} of {plotted['n_layers']}): "
        f"![split pareto](data/{PLOT.name})\n\n"
        "Finding. Alone, no objective is ever won by a split: every block costs a fixed time on a device, so "
        "TTFT, time per token and edge energy are linear in k between the ends, and a split adds the hidden "
        "state's transfer (a prompt's worth before the first token, a round trip every token) that neither end "
        "pays; cloud-only spends no edge energy at all. A split pays only on the trade-off: when the edge is faster "
        "per layer than the cloud (here only against cloud-cpu-2core, the hub on its own CPU), the cuts between "
        "the ends trade edge energy for latency, and a budget between the ends' figures is met by a split at a "
        "fraction of edge-only's energy or well under cloud-only's TTFT. Behind a slow uplink (LTE-M, GEO "
        "satellite) the prompt's hidden states take too long and even that disappears; time per token pays a "
        "round trip per token and gains only on the LAN.\n\n"
        f"```json\n{json.dumps(head)}\n```"
    )
    write_block("split", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON line of headline figures")
    p.add_argument("--write-docs", action="store_true", help="update this benchmark's section of docs/benchmarks.md")
    p.add_argument("--plot", type=Path, help=f"write the Pareto plot here (with --write-docs: {_shown(PLOT)})")
    args = p.parse_args()
    t0 = time.perf_counter()
    all_cases, skipped = cases()
    if not all_cases:
        sys.exit("no model is pulled: " + "; ".join(skipped))
    rows = [solve(c, s) for c in all_cases for s in SCENARIOS]
    summary = summarise(rows)
    head = headline(summary, len(all_cases), skipped, time.perf_counter() - t0)
    case = pareto_case(rows)
    head["pareto"] = {k: v for k, v in case.items() if k not in ("row", "chosen")}
    plot = args.plot or (PLOT if args.write_docs else None)
    if plot:
        plot_case(case, plot)
        head["pareto"]["file"] = _shown(plot)
    print(
        json.dumps(head) if args.json else summary_table(summary, by_cloud(rows)) + "\n\n" + table(representative(rows))
    )
    if args.write_docs:
        write_docs(summary, rows, head, head["pareto"])


if __name__ == "__main__":
    main()
