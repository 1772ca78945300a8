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
    ok = [(p, k) for k, p in ends.items() if fits_memory(p) and not over_budget(p, budgets)]
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
