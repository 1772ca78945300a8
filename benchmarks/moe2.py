"""MoE² against its baselines (issue 17): held-out quality, energy and latency over a grid of budgets.

Set-up: the example fleet (device_profiles/fleets/example.yaml: 14 experts, SmolLM2-135M and Gemma 3
270M variants on seven edge device profiles, the hub's CPU as the cloud expert), each expert's latency and
edge energy per request from the cost model for a reference request (partitioner.moe2.fleet), real-text
requests from the corpus (partitioner.moe2.dataset: calibration and evaluation documents disjoint).
The gate is trained on the calibration requests only (a gate `tandem experts train` left in the cache
is reused when it was trained on the same calibration requests; else one is trained, deterministic
for the seed), and every policy selects on the calibration requests (the table, as the hub does).

Quality is measured on the held-out evaluation requests: each request is routed within the policy's
selection by the gate's weights for that request's own features (top-k, objective.route; the
threshold router by its cloud threshold), and its loss (bits per byte of its true continuation) read
from the evaluation loss matrix; lower is better. Energy and latency are per request, predicted:
the mean over the evaluation requests of what their routed experts spend (k > 1: the experts' energy
summed, the slowest's latency), and the selection's worst case, which the budget bounds.

Goal: MoE² is never worse than any baseline at the same budget, and strictly better than each at
some budget. Counted twice: every difference over 1e-9 bits per byte, and only differences beyond
two standard errors of the paired per-request difference (the noise of the held-out requests). At
a budget where a policy finds no feasible selection it has no quality: MoE² feasible and a baseline
not counts as MoE² better, both infeasible as a tie (MoE²'s search is exact over all subsets, so it
is infeasible only where every policy is). Equal within 1e-9 bits per byte is a tie.

    python benchmarks/moe2.py                             # tables
    python benchmarks/moe2.py --json                      # one JSON line of headline figures
    python benchmarks/moe2.py --json --write-docs         # and its section of docs/benchmarks.md, and the plot
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partitioner.moe2.experts import Budget, Problem, SelectionError  # noqa: E402
from partitioner.moe2.features import KINDS  # noqa: E402
from partitioner.moe2.fleet import FleetError, Planned, RequestSize, load_fleet, plan_problem  # noqa: E402
from partitioner.moe2.objective import GatedObjective, column_objective, route  # noqa: E402
from partitioner.moe2.registry import POLICIES, make_policy  # noqa: E402
from partitioner.moe2.select import Selection  # noqa: E402
from partitioner.moe2.table import ExpertTable  # noqa: E402

FLEET = ROOT / "device_profiles" / "fleets" / "example.yaml"
PLOT = ROOT / "docs" / "data" / "moe2.png"
ENERGY_J = (1.0, 2.0, 4.0, 8.0, 16.0, None)
"""Energy budgets per request, J (None: unconstrained)."""
LATENCY_MS = (100.0, 200.0, 400.0, 800.0, 1600.0, None)
"""Latency budgets per request, ms (None: unconstrained); the cloud expert needs about 1.3 s."""
TIE = 1e-9
"""Bits per byte within which two policies' held-out qualities are equal."""
BASELINES = tuple(p for p in POLICIES if p != "moe2")


@dataclass(frozen=True)
class Outcome:
    """One policy at one budget: its selection's held-out figures, or infeasible."""

    policy: str
    energy_budget: float | None
    latency_budget: float | None
    k: int
    subset: tuple[str, ...] = ()
    """The selected experts; empty when infeasible."""
    calibration_bpb: float = float("nan")
    """The selection's objective on the calibration requests (what the policy optimised)."""
    bpb: float = float("nan")
    """Held-out quality: mean loss of the evaluation requests routed within the selection."""
    energy_j: float = float("nan")
    """Mean predicted edge energy of the routed evaluation requests."""
    latency_ms: float = float("nan")
    """Mean predicted latency of the routed evaluation requests."""
    worst_energy_j: float = float("nan")
    """The selection's worst case per request (what the budget bounds)."""
    worst_latency_ms: float = float("nan")
    binding: str = ""
    """The binding constraint when infeasible."""
    losses: np.ndarray | None = field(default=None, repr=False, compare=False)
    """(R,) each evaluation request's loss; None when infeasible."""

    @property
    def feasible(self) -> bool:
        return bool(self.subset)


def held_out(
    problem: Problem, evaluation: GatedObjective, chosen: Selection, k: int
) -> tuple[np.ndarray, float, float]:
    """((R,) losses, mean energy J, mean latency ms) of the evaluation requests routed within `chosen`:
    the gate's top-k for each request's weights (evaluation.weights, over the same experts as
    `problem`), or, for a threshold router's selection, the cloud when the request's cloud weight
    exceeds the threshold and the edge expert otherwise."""
    es, rows = problem.experts, np.arange(evaluation.n_requests)
    idx = [problem.index(i) for i in chosen.subset]
    if chosen.threshold is not None:
        clouds = [i for i in idx if es[i].kind == "cloud"]
        edges = [i for i in idx if es[i].kind == "edge"]
        cloud, edge = (clouds or edges)[0], (edges or clouds)[0]
        picked = np.where(evaluation.weights[:, cloud] > chosen.threshold, cloud, edge)  # (R,)
        losses = evaluation.losses[rows, picked]
        routed: list[tuple[int, ...]] = [(int(i),) for i in picked]
    else:
        losses = evaluation.request_losses(idx, k)
        tokenizers = [e.tokenizer for e in es]
        routed = [route(evaluation.weights[r], tokenizers, idx, k)[0] for r in rows]
    energy = [sum(es[i].energy_j for i in r) for r in routed]
    latency = [max(es[i].latency_ms for i in r) for r in routed]
    return losses, float(np.mean(energy)), float(np.mean(latency))


def outcome(name: str, planned: Planned, evaluation: GatedObjective, budget: Budget) -> Outcome:
    """Policy `name`'s selection at `budget`, measured on the evaluation requests."""
    head = (name, budget.energy_j, budget.latency_ms, budget.k)
    try:
        chosen = make_policy(name).choose(planned.problem, budget)
    except SelectionError as exc:
        return Outcome(*head, binding=exc.binding)
    losses, energy, latency = held_out(planned.problem, evaluation, chosen, budget.k)
    bpb = float(losses.mean())
    return Outcome(*head, chosen.subset, chosen.objective, bpb, energy, latency, chosen.energy_j, chosen.latency_ms,
                   losses=losses)  # fmt: skip


def compare(ours: Outcome, theirs: Outcome, field: str = "bpb") -> int:
    """-1: `ours` strictly better at this budget, 1: strictly worse, 0: a tie (module docstring)."""
    if not ours.feasible or not theirs.feasible:
        return 0 if ours.feasible == theirs.feasible else (-1 if ours.feasible else 1)
    a, b = getattr(ours, field), getattr(theirs, field)
    return 0 if abs(a - b) <= TIE else (-1 if a < b else 1)


def paired_se(diff: np.ndarray, clusters: np.ndarray | None = None) -> float:
    """The standard error of diff.mean() for (R,) per-request differences: over requests, or, given
    (R,) `clusters` (each request's document), cluster-robust: requests cut from one document are
    correlated, so they count as one draw (sqrt(G / (G - 1) * sum_g (sum_{r in g} (d_r - mean))^2) / R).
    NaN with fewer than two requests or documents."""
    n = len(diff)
    ids = np.arange(n) if clusters is None else np.unique(clusters, return_inverse=True)[1]  # by request: G = R
    g = int(ids.max()) + 1 if n else 0
    if g < 2:
        return math.nan
    sums = np.bincount(ids, weights=diff - diff.mean())  # (G,) each document's centred sum
    return float(np.sqrt(g / (g - 1) * (sums**2).sum()) / n)


def significant(ours: Outcome, theirs: Outcome, clusters: np.ndarray | None = None) -> bool:
    """Whether `ours`'s held-out loss exceeds `theirs` by more than two standard errors of the paired
    per-request difference (paired_se, by document when `clusters` are given); always, where only
    `theirs` is feasible; never, where neither is."""
    if not ours.feasible or not theirs.feasible or ours.losses is None or theirs.losses is None:
        return not ours.feasible and theirs.feasible
    diff = ours.losses - theirs.losses  # (R,) same requests, paired
    se = paired_se(diff, clusters)
    return bool(se == se and diff.mean() > max(2 * se, TIE))  # se == se: not NaN


def verdict(rows: Sequence[Outcome], field: str = "bpb", clusters: np.ndarray | None = None) -> dict:
    """Per baseline, at how many budgets MoE² is strictly better and strictly worse, how far at most each
    baseline's own objective (calibration BPB) trails MoE²'s exact optimum, and, on held-out BPB
    (field "bpb"), at how many MoE² is better and worse by more than two paired standard errors (by
    document with `clusters`). The goal is met when MoE² is worse at none and better than each at some:
    `goal_met` counts every difference over 1e-9 BPB, `goal_met_2se` only those beyond the noise."""
    ours = {(r.energy_budget, r.latency_budget, r.k): r for r in rows if r.policy == "moe2"}
    better, worse, better_2se, worse_2se, margin = {}, {}, {}, {}, {}
    for name in BASELINES:
        pairs = [(ours[(r.energy_budget, r.latency_budget, r.k)], r) for r in rows if r.policy == name]
        signs = [compare(o, r, field) for o, r in pairs]
        better[name], worse[name] = signs.count(-1), signs.count(1)
        gaps = [r.calibration_bpb - o.calibration_bpb for o, r in pairs if o.feasible and r.feasible]
        margin[name] = max(gaps, default=0.0)
        if field == "bpb":
            both = list(zip(signs, pairs, strict=True))
            worse_2se[name] = sum(s == 1 and significant(o, r, clusters) for s, (o, r) in both)
            better_2se[name] = sum(s == -1 and significant(r, o, clusters) for s, (o, r) in both)
    out = {"goal_met": _met(worse, better), "better": better, "worse": worse, "calibration_margin": margin,
           "budgets": len(ours)}  # fmt: skip
    if field == "bpb":
        out |= {"goal_met_2se": _met(worse_2se, better_2se), "better_2se": better_2se, "worse_2se": worse_2se}
    return out


def _met(worse: dict[str, int], better: dict[str, int]) -> bool:
    """The goal: worse than no baseline at any budget, better than each at some."""
    return all(v == 0 for v in worse.values()) and all(v > 0 for v in better.values())


def grid(ks: Sequence[int]) -> list[Budget]:
    return [Budget(e, lat, k) for k in ks for lat in LATENCY_MS for e in ENERGY_J]


# -- the set-up (imports torch: the splits, features and gate) --------------------------------------------


def gate_for(kind: str, cal, seed: int):
    """The gate for `kind`: `tandem experts train`'s cached one when its table holds these calibration
    requests' losses, else one trained here (fit_gate: weight decay cross-validated), and where it came from."""
    from partitioner.moe2.gate import Gate, GateConfig, GateMismatch
    from tandem_cli.experts import default_gate, fit_gate, table_path

    path = default_gate(kind, seed)
    try:
        gate = Gate.load(path, cal.matrix.expert_ids, kind)
        if np.array_equal(ExpertTable.load(table_path(path)).losses, cal.matrix.losses):
            return gate, f"from `tandem experts train` (<tandem cache>/moe2/{path.name})"
    except (FileNotFoundError, GateMismatch, ValueError):
        pass
    gate, wd = fit_gate(cal, kind, GateConfig(seed=seed))
    return gate, f"trained here (seed {seed}, weight decay {wd:g} cross-validated)"


def setup(
    kind: str, n_cal: int, n_eval: int, seed: int, request: RequestSize
) -> tuple[Planned, GatedObjective, np.ndarray, dict]:
    """The fleet's problem on the calibration requests, the evaluation objective over the same experts,
    the (R,) evaluation requests' documents (paired_se's clusters), and facts about the gate."""
    from partitioner.moe2.dataset import PromptSpec
    from partitioner.moe2.features import prepare_split
    from partitioner.moe2.gate_measures import held_out as gate_held_out
    from tandem_cli.experts import card

    cal = prepare_split("calibration", PromptSpec(n_cal), kind)
    ev = prepare_split("eval", PromptSpec(n_eval), kind)
    gate, origin = gate_for(kind, cal, seed)
    m = cal.matrix
    table = ExpertTable(m.expert_ids, m.tokenizers, gate.weights(cal.features), m.losses, m.n_bytes)
    planned = plan_problem(load_fleet(FLEET, table.variants), table, card, request)
    w = gate.weights(ev.features)  # (R, V) the gate on each held-out prompt's own features
    evaluation = column_objective(w, ev.matrix.losses, m.tokenizers, ev.matrix.n_bytes, planned.columns)
    fig = gate_held_out(gate, ev.features, ev.matrix.losses)
    facts = {"origin": origin, "gate_top1_bpb": fig.gate_routed, "best_single_bpb": fig.best_single,
             "best_single": fig.best_single_id, "oracle_bpb": fig.oracle}  # fmt: skip
    documents = np.unique([r.document for r in ev.requests], return_inverse=True)[1]  # (R,)
    return planned, evaluation, documents, {**facts, "evaluation_documents": int(documents.max()) + 1}


def run(kind: str, args: argparse.Namespace) -> tuple[Planned, list[Outcome], np.ndarray, dict]:
    """Every policy at every budget: (the problem, the outcomes, the evaluation requests' documents, facts)."""
    request = RequestSize(args.prompt_tokens, args.max_tokens)
    planned, evaluation, documents, facts = setup(kind, args.calibration, args.evaluation, args.seed, request)
    rows = [outcome(p, planned, evaluation, b) for b in grid(args.k) for p in POLICIES]
    return planned, rows, documents, facts


# -- figures ------------------------------------------------------------------------------------------


def worst_margin(rows: Sequence[Outcome]) -> float:
    """The most MoE²'s held-out BPB exceeds a feasible baseline's at one budget (0: never worse)."""
    ours = {(r.energy_budget, r.latency_budget, r.k): r for r in rows if r.policy == "moe2"}
    gaps = [ours[(r.energy_budget, r.latency_budget, r.k)].bpb - r.bpb for r in rows if r.policy != "moe2"]
    return max([0.0, *(g for g in gaps if g == g)])  # g == g: both feasible (nan otherwise)


def summary_of(rows: Sequence[Outcome], facts: dict, documents: np.ndarray | None = None) -> dict:
    """The headline figures of one feature kind's run; standard errors by document when `documents`."""
    ours = [r.bpb for r in rows if r.policy == "moe2" and r.feasible]
    held, cal = verdict(rows, clusters=documents), verdict(rows, "calibration_bpb")
    return {
        "goal_met": held["goal_met"],
        "better": held["better"],
        "worse": held["worse"],
        "goal_met_2se": held["goal_met_2se"],
        "better_2se": held["better_2se"],
        "worse_2se": held["worse_2se"],
        "calibration_margin_bpb": {name: round(v, 4) for name, v in held["calibration_margin"].items()},
        "worst_margin_bpb": round(worst_margin(rows), 4),
        "calibration_goal_met": cal["goal_met"],
        "calibration_worse": sum(cal["worse"].values()),
        "moe2_feasible": len(ours),
        "moe2_mean_bpb": round(statistics.mean(ours), 4),
        **{key: round(v, 4) if isinstance(v, float) else v for key, v in facts.items()},
    }


def headline(planned: Planned, per_kind: dict[str, dict], args: argparse.Namespace) -> dict:
    primary = args.features[0]
    es = planned.problem.experts
    return {
        "benchmark": "moe2",
        "goal_met": per_kind[primary]["goal_met"],
        "goal_met_2se": per_kind[primary]["goal_met_2se"],
        "features": primary,
        "experts": len(es),
        "cloud_experts": sum(e.kind == "cloud" for e in es),
        "calibration": args.calibration,
        "evaluation": args.evaluation,
        "k": list(args.k),
        "budgets": len(grid(args.k)),
        "request": [args.prompt_tokens, args.max_tokens],
        "by_features": per_kind,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", nargs="+", choices=KINDS, default=["hidden", "minilm"],
                   help="gate feature kinds (the issue's two by default); the first leads")  # fmt: skip
    p.add_argument("--k", type=int, nargs="+", default=[1, 2], help="experts per request")
    p.add_argument("--calibration", type=int, default=200, help="calibration requests (gate and selection)")
    p.add_argument("--evaluation", type=int, default=400, help="held-out evaluation requests (quality)")
    p.add_argument("--seed", type=int, default=0, help="the gate's seed")
    p.add_argument("--prompt-tokens", type=int, default=96, help="the reference request's prompt tokens")
    p.add_argument("--max-tokens", type=int, default=48, help="the reference request's new tokens")
    p.add_argument("--json", action="store_true", help="print one JSON line of headline figures")
    p.add_argument("--write-docs", action="store_true", help="update this benchmark's section of docs/benchmarks.md")
    args = p.parse_args()
    from benchmarks.moe2_report import experts_table, plot, tables, verdict_text, write_docs

    start = time.perf_counter()
    per_kind, first = {}, None
    for kind in args.features:
        try:
            planned, rows, documents, facts = run(kind, args)
        except FleetError as exc:
            sys.exit(f"error: {exc}")
        per_kind[kind] = summary_of(rows, facts, documents)
        print(f"# {verdict_text(kind, per_kind[kind])}", file=sys.stderr, flush=True)
        first = first or (planned, rows)
    planned, rows = first
    summary = headline(planned, per_kind, args)
    if args.write_docs:
        plot(rows)
        write_docs(planned, rows, summary, time.perf_counter() - start)
    print(json.dumps(summary) if args.json else experts_table(planned) + "\n\n" + tables(rows))


if __name__ == "__main__":
    # benchmarks.moe2_report imports this module by name: let it find this run's, not a second copy
    sys.modules.setdefault("benchmarks.moe2", sys.modules[__name__])
    main()
