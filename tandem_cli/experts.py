"""`tandem experts train`: measure every expert variant on real text, train MoE²'s gate, report it.

The work is partitioner.moe2 (dataset: requests and losses; features: prompt features; gate:
training and measures); this module parses, shows progress and prints the figures. Losses and
features are cached under the Tandem cache, so only the first run pays for them (about half an hour
on two cores for the default 200 + 100 requests and nine variants). partitioner.moe2 is imported
inside the command: it imports torch (about 2 s on two cores), which `tandem --help` must not pay for.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from partitioner.moe2.gate import HeldOut, SubsetGap


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
    from models.zoo import cache_dir
    from partitioner.moe2.dataset import VARIANTS, PromptSpec
    from partitioner.moe2.features import prepare_split
    from partitioner.moe2.gate import (
        GateConfig,
        choose_weight_decay,
        held_out,
        optimality_gaps,
        random_subsets,
        train_gate,
    )
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
    with tqdm(total=2, desc="train gate (cross-validate, fit)", file=sys.stderr) as bar:
        wd = args.weight_decay
        if wd is None:
            wd = choose_weight_decay(*cal_xy, cal.matrix.expert_ids, args.features, cfg)
        bar.update(1)
        gate = train_gate(*cal_xy, cal.matrix.expert_ids, args.features, replace(cfg, weight_decay=wd))
        bar.update(1)
    took = time.perf_counter() - start
    out = gate.save(Path(args.out) if args.out else cache_dir() / "moe2" / f"gate-{args.features}-{args.seed}.pt")
    m = gate.manifest
    mat = cal.matrix  # the hub's router (--router-policy moe2) reads the gate's weights and losses from this
    table = ExpertTable(mat.expert_ids, mat.tokenizers, gate.weights(cal.features), mat.losses, mat.n_bytes)
    table_path = table.save(out.with_suffix(".table.npz"))
    print(f"gate: {out} ({m.feature_kind} features, {m.dims}-d, {len(m.expert_ids)} experts, seed {m.config.seed})")
    print(f"expert table for the hub: {table_path} (tandem hub up --router-policy moe2 --moe2-table ...)")
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experts", help="MoE² experts: measure them and train the gate")
    cmds = p.add_subparsers(dest="experts_command", required=True)
    t = cmds.add_parser("train", help="measure every expert variant on real text and train the gate")
    t.add_argument("--features", choices=["hidden", "minilm"], default="hidden", help="the gate's input")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="gate file (default: <tandem cache>/moe2/gate-<features>-<seed>.pt)")
    t.add_argument("--hidden", type=int, default=0, help="hidden layer width (default 0: a linear softmax)")
    t.add_argument("--weight-decay", type=float, help="L2 penalty (default: cross-validated on calibration)")
    t.add_argument("--subset-dropout", type=float, default=0.5, help="train on random subsets too (0: plain MoE²)")
    t.add_argument("--calibration", type=int, default=200, help="calibration requests (training)")
    t.add_argument("--evaluation", type=int, default=100, help="evaluation requests (held out)")
    t.add_argument("--subsets", type=int, default=5, help="random subsets for the optimality test (0: skip)")
    t.set_defaults(func=cmd_train)
