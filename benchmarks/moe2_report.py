"""benchmarks/moe2.py's output: the tables, the plot and its section of docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.docs_block import command_line, write_block
from benchmarks.moe2 import BASELINES, ENERGY_J, FLEET, LATENCY_MS, PLOT, ROOT, TIE, Outcome
from partitioner.moe2.fleet import Planned
from partitioner.moe2.registry import POLICIES


def _budget(value: float | None, unit: str) -> str:
    return "none" if value is None else f"{value:g} {unit}"


def _cell(r: Outcome, best: float | None) -> str:
    """A policy's held-out BPB, bold where it is the best at its budget; "-" when infeasible."""
    if not r.feasible:
        return "-"
    return f"**{r.bpb:.4f}**" if best is not None and r.bpb <= best + TIE else f"{r.bpb:.4f}"


def tables(rows: Sequence[Outcome]) -> str:
    """Per k: held-out BPB of every policy per budget, then each policy's mean energy and latency per
    request there."""
    head = ["| energy | latency | " + " | ".join(POLICIES) + " |", "|---|---|" + "---|" * len(POLICIES)]
    out = []
    for k in sorted({r.k for r in rows}):
        bpb = [f"k = {k}: held-out BPB (lower is better; bold: the best; -: infeasible)", "", *head]
        cost = [f"k = {k}: mean energy J / latency ms per request", "", *head]
        for lat in LATENCY_MS:
            for e in ENERGY_J:
                at = {r.policy: r for r in rows if (r.k, r.energy_budget, r.latency_budget) == (k, e, lat)}
                best = min((r.bpb for r in at.values() if r.feasible), default=None)
                lead = f"| {_budget(e, 'J')} | {_budget(lat, 'ms')} | "
                bpb.append(lead + " | ".join(_cell(at[p], best) for p in POLICIES) + " |")
                spent = [f"{at[p].energy_j:.2f} / {at[p].latency_ms:.0f}" if at[p].feasible else "-" for p in POLICIES]
                cost.append(lead + " | ".join(spent) + " |")
        out += [*bpb, "", *cost, ""]
    return "\n".join(out)


def plot(rows: Sequence[Outcome], path: Path = PLOT, k: int = 1) -> Path:
    """Held-out BPB against the energy budget, one panel per latency budget, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (200.0, 800.0, None)
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.5), sharey=True)
    x = np.arange(len(ENERGY_J))
    for ax, lat in zip(axes, panels, strict=True):
        for i, name in enumerate(POLICIES):
            at = {r.energy_budget: r for r in rows if (r.policy, r.k, r.latency_budget) == (name, k, lat)}
            y = [at[e].bpb if at[e].feasible else np.nan for e in ENERGY_J]
            style = {"lw": 3, "color": "black", "zorder": 5} if name == "moe2" else {"lw": 1.2, "alpha": 0.8}
            ax.plot(x + (i - 3.5) * 0.02, y, marker="o", ms=4, label=name, **style)
        ax.set_xticks(x, [_budget(e, "J") for e in ENERGY_J])
        ax.set_xlabel("energy budget per request")
        ax.set_title(f"latency budget {_budget(lat, 'ms')}, k = {k}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out bits per byte (lower is better)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("MoE² and the baselines on the example fleet (missing points: no feasible selection)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def experts_table(planned: Planned) -> str:
    out = ["| expert | profile kind | latency ms | energy J | calibration BPB |", "|---|---|---|---|---|"]
    for e in sorted(planned.problem.experts, key=lambda e: (e.quality, e.id)):
        out.append(f"| {e.id} | {e.kind} | {e.latency_ms:.0f} | {e.energy_j:.2f} | {e.quality:.4f} |")
    return "\n".join(out)


def verdict_text(kind: str, s: dict) -> str:
    met, met_2se = ("met" if s[key] else "NOT met" for key in ("goal_met", "goal_met_2se"))
    counts = ", ".join(f"{b} {s['better'][b]}/{s['worse'][b]}" for b in BASELINES)
    counts_2se = ", ".join(f"{b} {s['better_2se'][b]}/{s['worse_2se'][b]}" for b in BASELINES)
    margins = ", ".join(f"{b} {v:.4f}" for b, v in s["calibration_margin_bpb"].items())
    return (f"{kind} features: goal {met} on held-out BPB, counting every difference (MoE² better/worse than each "
            f"baseline, of {s['moe2_feasible']} feasible budgets: {counts}; worse by at most "
            f"{s['worst_margin_bpb']:.4f} BPB). Beyond two paired standard errors the goal is {met_2se} "
            f"({counts_2se}). On the calibration objective MoE² is worse at {s['calibration_worse']} (baseline, "
            f"budget) pairs; each baseline's objective trails MoE²'s optimum by at most: {margins}. Gate top-1 "
            f"{s['gate_top1_bpb']:.4f} BPB held out, best single variant {s['best_single_bpb']:.4f} "
            f"({s['best_single']}), oracle {s['oracle_bpb']:.4f}; gate {s['origin']}.")  # fmt: skip


def first_documents(summary: dict) -> int:
    """How many documents the evaluation requests were cut from (the same for every feature kind)."""
    return next(iter(summary["by_features"].values()))["evaluation_documents"]


def reading(summary: dict) -> str:
    """What the figures say, read from them: where MoE² loses, whether beyond the noise, and how close
    greedy's own objective came to the exact optimum."""
    kinds = summary["by_features"]
    lost = {kind: sum(s["worse"].values()) for kind, s in kinds.items()}
    clear = {kind: sum(s["worse_2se"].values()) for kind, s in kinds.items()}
    greedy = max(s["calibration_margin_bpb"]["greedy"] for s in kinds.values())
    parts = ["Reading: on the objective it optimises (the calibration requests) MoE² is exact, so never worse."]
    if any(lost.values()):
        where = "; ".join(f"{k}: {lost[k]} (baseline, budget) pairs, {clear[k]} beyond the noise" for k in kinds)
        parts.append(f"On held-out requests the calibration optimum does not always carry over ({where}).")
    parts.append(
        "The budgets here bound each request (its expert's energy and latency; at k > 1 its members' summed energy "
        "and slowest latency), so one expert's cost never trades against another's, and greedy by quality per joule "
        f"ends within {greedy:.4f} bits per byte of the exact optimum on the calibration requests (its margin above): "
        "where MoE² and greedy differ, the difference is that small. SmolLM2's fp32, int4 and source variants score "
        "alike because its GGUF is Q4_1 (fp32 is the dequantized Q4_1), so which of them a subset holds is decided "
        "by differences of about 0.001 BPB."
    )
    return " ".join(parts)


def write_docs(planned: Planned, rows: Sequence[Outcome], summary: dict, seconds: float) -> None:
    from edge_agent.measurements import cpu_name  # imports torch (~3 s): only when writing the docs

    req = planned.request
    body = (
        "## MoE² against the baselines (issue 17)\n\n"
        f"Command: `{command_line()}`  \nMachine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores "
        f"(shared); Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}; {seconds:.0f} s (losses and "
        "features from the cache).  \n"
        f"Fleet: {FLEET.relative_to(ROOT)} ({summary['experts']} experts, the hub's CPU as the cloud expert); costs "
        f"from the cost model for a reference request of {req.prompt_tokens} prompt and {req.max_tokens} new tokens "
        f"(latency: the whole request). Gate and selection on {summary['calibration']} calibration requests; quality "
        f"on {summary['evaluation']} held-out evaluation requests (cut from {first_documents(summary)} other "
        "documents), each routed by the gate's "
        "weights for its own features within the policy's selection. Budgets: energy "
        f"{', '.join(_budget(e, 'J') for e in ENERGY_J)} x latency {', '.join(_budget(x, 'ms') for x in LATENCY_MS)}"
        f" x k {', '.join(map(str, summary['k']))}. Infeasible (no selection within the budget): MoE² feasible and "
        "a baseline not counts as MoE² better; both infeasible, a tie; equal within 1e-9 BPB, a tie. Beyond the "
        "noise: the paired per-request difference's mean exceeds two standard errors, counted by document "
        "(requests cut from one document are correlated; paired_se).\n\n"
        "Goal: MoE² never worse than any baseline at the same budget, strictly better than each at some.  \n"
        + "  \n".join(verdict_text(kind, s) for kind, s in summary["by_features"].items())
        + "\n\n"
        + reading(summary)
        + "\n\n"
        + f"![MoE² and the baselines](data/{PLOT.name})\n\n"
        + experts_table(planned)
        + f"\n\n{summary['features']} features:\n\n"
        + tables(rows)
        + f"\n```json\n{json.dumps(summary)}\n```"
    )
    write_block("moe2", body)
