"""`tandem optimize`: quantize and/or prune a model into a bundle; print its size, speed and quality.

The work is `models.optimize.optimize`; this module parses, shows progress and prints the report.
models.optimize is imported inside the command: it imports torch (about 2 s on two cores), which
`tandem --help` and the other commands must not pay for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from models.optimize import OptimizeReport

QUANT_BITS = {"none": None, "int8": 8, "int4": 4}


def print_report(report: OptimizeReport) -> None:
    """The three summary lines on stdout (scripts parse them: keep their form)."""
    mb_disk, mb_weights = report.size_bytes / 1e6, report.weight_bytes / 1e6
    print(f"bundle: {report.bundle} ({mb_disk:.1f} MB on disk, weights {mb_weights:.1f} MB, {report.n_layers} layers)")
    print(f"speed: {report.decode_tok_s:.1f} decode tok/s (this machine, {report.threads} threads)")
    print(
        f"quality: {report.bpb_new:.4f} bits/byte vs {report.bpb_base:.4f} for the base ({report.bpb_change:+.2%}), "
        f"top-1 agreement {report.agreement:.3f}"
    )


def cmd_optimize(args: argparse.Namespace) -> int:
    from models.optimize import STAGES, optimize  # lazy: imports torch (see the module docstring)
    from models.runtime import load

    with tqdm(total=1 + len(STAGES), desc="optimize", file=sys.stderr) as steps:  # loading, then each stage
        base = load(args.model)
        steps.update(1)
        report = optimize(
            base,
            Path(args.out),
            source=str(args.model),
            bits=QUANT_BITS[args.quant],
            group_size=args.group_size,
            drop_layers=args.prune_layers,
            progress=lambda _stage: steps.update(1),
        )
    if args.prune_layers:
        print(f"kept layers: {list(report.kept_layers)}", file=sys.stderr)
    print_report(report)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optimize", help="quantize and/or prune a model into a bundle")
    p.add_argument("--model", default="smollm2-135m-instruct", help="zoo name or .gguf path")
    p.add_argument("--quant", choices=list(QUANT_BITS), default="int4")
    p.add_argument("--group-size", type=int, help="quantization group (default: per channel for int8, 32 for int4)")
    p.add_argument("--prune-layers", type=int, default=0, help="drop this many layers (least block influence)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.set_defaults(func=cmd_optimize)
