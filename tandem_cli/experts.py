"""`tandem experts train`: measure every expert variant on real text, train MoE²'s gate, report it.
`tandem experts plan`: the subset of a fleet file's experts that MoE² selects within a budget.

The work is partitioner.moe2 (dataset: requests and losses; features: prompt features; gate:
training and measures); this module parses, shows progress and prints the figures. Losses and
features are cached under the Tandem cache, so only the first run pays for them (about half an hour
on two cores for the default 200 + 100 requests and nine variants). partitioner.moe2 is imported
inside the command: it imports torch (about 2 s on two cores), which `tandem --help` must not pay for.
`plan` reads no torch: the fleet (partitioner.moe2.fleet), the gate's table (numpy) and the models'
cards (tandem_cli.partition.model_card: the GGUF header, cached as JSON); partitioner.moe2 is still
imported inside it, since it pulls numpy in (0.24 s on two cores, measured with -X importtime).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from models.config import ModelConfig
from models.zoo import cache_dir
from tandem_cli.partition import model_card

if TYPE_CHECKING:
    from partitioner.moe2.features import Split
    from partitioner.moe2.fleet import Planned
    from partitioner.moe2.gate import Gate, GateConfig
    from partitioner.moe2.gate_measures import HeldOut, SubsetGap
    from partitioner.moe2.select import Selection


def default_gate(features: str = "hidden", seed: int = 0) -> Path:
    """Where `tandem experts train` writes its gate by default."""
    return cache_dir() / "moe2" / f"gate-{features}-{seed}.pt"


def table_path(gate: Path) -> Path:
    """The expert table of a gate file (written beside it), or `gate` itself when it is a table (.npz)."""
    return gate if gate.suffix == ".npz" else gate.with_suffix(".table.npz")


def feature_kind(value: str) -> str:
    """argparse type: a feature kind of partitioner.moe2.features (imported on use: it imports torch)."""
    from partitioner.moe2.features import KINDS

    if value not in KINDS:
        raise argparse.ArgumentTypeError(f"unknown feature kind {value!r}; known: {', '.join(KINDS)}")
    return value


def fit_gate(cal: Split, kind: str, config: GateConfig, weight_decay: float | None = None) -> tuple[Gate, float]:
    """The gate trained on the calibration split (train_gate), and its weight decay: `weight_decay`, or
    cross-validated on the calibration requests when None (choose_weight_decay). Deterministic for
    config.seed."""
    from partitioner.moe2.gate import train_gate
    from partitioner.moe2.gate_measures import choose_weight_decay

    x, losses, ids = cal.features, cal.matrix.losses, cal.matrix.expert_ids
    wd = choose_weight_decay(x, losses, ids, kind, config) if weight_decay is None else weight_decay
    return train_gate(x, losses, ids, kind, replace(config, weight_decay=wd)), wd


def print_held_out(fig: HeldOut, n: int) -> None:
    """The held-out line on stdout: the gate against the best single expert and the oracle."""
    print(
        f"held-out ({n} evaluation requests, bits/byte): gate mixture {fig.gate_expected:.4f}, gate top-1 "
        f"{fig.gate_routed:.4f}, best single {fig.best_single:.4f} ({fig.best_single_id}), uniform "
        f"{fig.uniform:.4f}, oracle {fig.oracle:.4f}"
    )


def print_gaps(gaps: list[SubsetGap]) -> None:
    """One line a subset: the full-set gate restricted to it against a gate retrained on it."""
    print("optimality on subsets (held-out bits/byte; gap = restricted - retrained, > 0: retraining helps):")
    for g in gaps:
        print(
            f"  {len(g.subset)} experts: restricted {g.restricted:.4f} retrained {g.retrained:.4f} gap {g.gap:+.4f}"
            f" | top-1 {g.restricted_routed:.4f} vs {g.retrained_routed:.4f} gap {g.routed_gap:+.4f}"
            f" | {', '.join(g.subset)}"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from partitioner.moe2.dataset import VARIANTS, PromptSpec
    from partitioner.moe2.features import prepare_split
    from partitioner.moe2.gate import GateConfig
    from partitioner.moe2.gate_measures import held_out, optimality_gaps, random_subsets
    from partitioner.moe2.table import ExpertTable

    splits = {}
    for split, n in (("calibration", args.calibration), ("eval", args.evaluation)):
        # R requests a variant, then R prompts' features; cached ones count at once
        with tqdm(total=n * (len(VARIANTS) + 1), desc=f"{split} losses, features", unit="req", file=sys.stderr) as bar:
            splits[split] = prepare_split(split, PromptSpec(n), args.features, progress=bar.update)
    cal, ev = splits["calibration"], splits["eval"]
    start = time.perf_counter()
    cal_xy, ev_xy = (cal.features, cal.matrix.losses), (ev.features, ev.matrix.losses)
    cfg = GateConfig(hidden=args.hidden, seed=args.seed, subset_dropout=args.subset_dropout)
    with tqdm(total=1, desc="train gate (cross-validate, fit)", file=sys.stderr) as bar:
        gate, wd = fit_gate(cal, args.features, cfg, args.weight_decay)
        bar.update(1)
    took = time.perf_counter() - start
    out = gate.save(Path(args.out) if args.out else default_gate(args.features, args.seed))
    m = gate.manifest
    mat = cal.matrix  # the hub's router (--router-policy moe2) reads the gate's weights and losses from this
    table = ExpertTable(mat.expert_ids, mat.tokenizers, gate.weights(cal.features), mat.losses, mat.n_bytes)
    written = table.save(table_path(out))
    print(f"gate: {out} ({m.feature_kind} features, {m.dims}-d, {len(m.expert_ids)} experts, seed {m.config.seed})")
    print(f"expert table for the hub: {written} (tandem hub up --router-policy moe2 --moe2-table ...)")
    print(
        f"trained in {took:.1f} s on {len(cal.requests)} calibration requests (weight decay {wd:g}"
        f"{' cross-validated' if args.weight_decay is None else ''}, subset dropout {cfg.subset_dropout:g})"
    )
    print_held_out(held_out(gate, ev.features, ev.matrix.losses), len(ev.requests))
    if args.subsets:
        subsets = random_subsets(len(m.expert_ids), args.subsets, seed=args.seed)
        gaps = [optimality_gaps(gate, cal_xy, ev_xy, [s])[0] for s in tqdm(subsets, desc="retrain", file=sys.stderr)]
        print_gaps(gaps)
    return 0


# -- plan --------------------------------------------------------------------------------------------------


def card(model: str) -> tuple[ModelConfig, int]:
    """A model's config and served bytes at "source" precision (partitioner.moe2.fleet.Card)."""
    c = model_card(model)
    return c.config, c.weight_bytes


def plan_json(planned: Planned, chosen: Selection, budget: dict, policy: str, table: Path) -> dict:
    """The plan's figures as one JSON object."""
    experts = {e.id: e for e in planned.problem.experts}
    figures = lambda e: {"quality_bpb": e.quality, "latency_ms": e.latency_ms, "energy_j": e.energy_j}  # noqa: E731
    req = planned.request
    return {
        "policy": policy,
        "subset": list(chosen.subset),
        "quality_bpb": chosen.objective,
        "latency_ms": chosen.latency_ms,
        "energy_j": chosen.energy_j,
        "budget": budget,
        "request": {"prompt_tokens": req.prompt_tokens, "max_tokens": req.max_tokens, "latency": req.latency},
        "table": str(table),
        "experts": {i: figures(experts[i]) for i in chosen.subset},
    }


def print_plan(planned: Planned, chosen: Selection, fleet: str, table: Path, k: int) -> None:
    """The chosen subset, one line an expert, and its predicted figures."""
    problem, req = planned.problem, planned.request
    what = "the whole request" if req.latency == "total_ms" else "time to first token"
    print(f"fleet {fleet}: {len(problem.experts)} experts; gate table {table}")
    print(f"reference request: {req.prompt_tokens} prompt tokens, {req.max_tokens} new tokens; latency = {what} "
          "(--prompt-tokens, --max-tokens, --latency-of)")  # fmt: skip
    print(f"chosen: {len(chosen.subset)} of {len(problem.experts)} experts")
    print(f"  {'expert':<44} {'quality BPB':>11} {'latency ms':>10} {'energy J':>9}")
    for e in sorted((problem.experts[problem.index(i)] for i in chosen.subset), key=lambda e: (e.quality, e.id)):
        print(f"  {e.id:<44} {e.quality:>11.4f} {e.latency_ms:>10.1f} {e.energy_j:>9.3f}")
    n = problem.objective.n_requests  # type: ignore[attr-defined]
    print(
        f"predicted: quality {chosen.objective:.4f} BPB (the gate's top-{k} within the subset, mean over {n} "
        f"calibration requests), latency {chosen.latency_ms:.1f} ms, energy {chosen.energy_j:.3f} J "
        "(worst case per request)"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from partitioner.moe2.experts import Budget, SelectionError
    from partitioner.moe2.fleet import FleetError, RequestSize, load_fleet, plan_problem
    from partitioner.moe2.registry import make_policy
    from partitioner.moe2.table import ExpertTable, TableError

    table_file = table_path(Path(args.gate) if args.gate else default_gate())
    try:
        table = ExpertTable.load(table_file)
        request = RequestSize(args.prompt_tokens, args.max_tokens, f"{args.latency_of}_ms")
        budget = Budget(args.energy_j, args.latency_ms, args.k)
        fleet = load_fleet(Path(args.fleet), table.variants)
        planned = plan_problem(fleet, table, card, request)
    except FileNotFoundError:
        print(f"error: no gate table at {table_file}: run `tandem experts train` (or pass --gate)", file=sys.stderr)
        return 2
    except (FleetError, TableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        chosen = make_policy(args.policy).choose(planned.problem, budget)
    except SelectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"binding constraint: {exc.binding}", file=sys.stderr)
        return 3
    if args.json:
        limits = {"energy_j": args.energy_j, "latency_ms": args.latency_ms, "k": args.k}
        print(json.dumps(plan_json(planned, chosen, limits, args.policy, table_file)))
    else:
        print_plan(planned, chosen, args.fleet, table_file, args.k)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experts", help="MoE² experts: measure them and train the gate")
    cmds = p.add_subparsers(dest="experts_command", required=True)
    t = cmds.add_parser("train", help="measure every expert variant on real text and train the gate")
    t.add_argument("--features", type=feature_kind, default="hidden", help="the gate's input (features.KINDS)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="gate file (default: <tandem cache>/moe2/gate-<features>-<seed>.pt)")
    t.add_argument("--hidden", type=int, default=0, help="hidden layer width (default 0: a linear softmax)")
    t.add_argument("--weight-decay", type=float, help="L2 penalty (default: cross-validated on calibration)")
    t.add_argument("--subset-dropout", type=float, default=0.5, help="train on random subsets too (0: plain MoE²)")
    t.add_argument("--calibration", type=int, default=200, help="calibration requests (training)")
    t.add_argument("--evaluation", type=int, default=100, help="evaluation requests (held out)")
    t.add_argument("--subsets", type=int, default=5, help="random subsets for the optimality test (0: skip)")
    t.set_defaults(func=cmd_train)
    pl = cmds.add_parser("plan", help="the experts of a fleet file that MoE² selects within a budget")
    pl.add_argument("--fleet", required=True, help="fleet file (e.g. device_profiles/fleets/example.yaml)")
    pl.add_argument("--energy-j", type=float, help="edge energy per request, J (default: unconstrained)")
    pl.add_argument("--latency-ms", type=float, help="latency per request, ms (default: unconstrained)")
    pl.add_argument("--k", type=int, default=1, help="experts per request: the gate's top-k within the subset")
    pl.add_argument("--gate", help="gate file, or its .table.npz (default: the one `tandem experts train` writes)")
    pl.add_argument("--prompt-tokens", type=int, default=96, help="the reference request's prompt tokens")
    pl.add_argument("--max-tokens", type=int, default=48, help="the reference request's new tokens")
    pl.add_argument("--latency-of", choices=["total", "ttft"], default="total",
                    help="an expert's latency: the whole request, or its time to first token")  # fmt: skip
    pl.add_argument("--policy", default="moe2", help="moe2 or a baseline (partitioner.moe2.registry.POLICIES)")
    pl.add_argument("--json", action="store_true", help="one JSON line")
    pl.set_defaults(func=cmd_plan)
