"""`tandem profile`: measure a model on this machine and write a calibrated device profile.

The work is edge_agent.profiler (measurements, the fit, the file); this module checks the
arguments before anything is measured, shows progress, prints the summary and writes the file.
The profiler is imported inside the command: it imports torch (about 2 s on two cores), which
`tandem --help` and the other commands must not pay for.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from device_profiles import DeviceProfile, ProfileError, load_profile
from partitioner import calibration as calib
from partitioner import cost as analytic

if TYPE_CHECKING:
    from edge_agent.profiler import Measured, Progress

DEFAULT_MODEL = "smollm2-135m-instruct"
HELP = (
    "measure a model on this machine (prefill at 16-2048 tokens, decode at 64-4096 positions, the head, "
    "a request's overhead, memory bandwidth, GEMM throughput) and write a device profile calibrated for it. "
    "SmolLM2 135M takes about 35 s on a 2-core host at source or int4, about 65 s at fp32 (longer on a busy "
    "host: a measurement disturbed by other processes is repeated); --quick about 8 s with loading."
)


def out_problem(path: Path) -> str:
    """Why `path` cannot receive the profile ('' when it can): checked by creating and removing a
    file beside it, before anything is measured."""
    if path.is_dir():
        return "is a directory"
    parent = path.parent
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        return f"cannot write in {parent}: {exc.strerror or exc}"
    return ""


def progress_printer() -> Progress:
    """A progress callback: a bar on a terminal, else one line a measurement (stderr)."""
    if sys.stderr.isatty():
        bar: tqdm | None = None

        def update(m: Measured) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=m.total, desc="profile", file=sys.stderr, leave=False)
            bar.set_postfix_str(f"{m.what}: {m.result}", refresh=False)
            bar.update(m.done - bar.n)
            if m.done >= m.total:
                bar.close()

        return update

    def line(m: Measured) -> None:
        print(f"[{m.done:>3}/{m.total}] {m.what}: {m.result} ({m.seconds:.2f} s)", file=sys.stderr, flush=True)

    return line


def summary(profile: DeviceProfile, cost: analytic.ModelCost, base: DeviceProfile) -> str:
    """Per sample: measured, calibrated and the base profile's analytic prediction (ms), with errors."""
    (cal,) = profile.calibrations
    analytic_head = f"{base.name} (analytic)"
    rows = [f"{'kind':<8} {'tokens':>6} {'measured':>10} {'calibrated':>11} {'error':>7} {analytic_head:>24}"]
    errors = []
    for s in cal.samples:
        if s.kind == "prefill":
            fitted = calib.layer_prefill_ms(cal, cost, s.tokens)
            prior = analytic.prefill_ms(base, cost, round(s.tokens)) / cost.n_layers
        elif s.kind == "decode":
            fitted, prior = calib.decode_ms(cal, cost, s.tokens), analytic.decode_ms(base, cost, s.tokens)
        else:
            rows.append(f"{s.kind:<8} {'':>6} {s.ms:>10.3f}")
            continue
        errors.append(100 * abs(fitted - s.ms) / s.ms)
        rows.append(f"{s.kind:<8} {s.tokens:>6.0f} {s.ms:>10.3f} {fitted:>11.3f} {errors[-1]:>6.1f}% {prior:>24.3f}")
    rows.append("(ms: prefill per layer, decode per token; error: calibrated against measured)")
    rows.append(
        f"calibrated error: median {calib.quantile(errors, 0.5):.1f}%, p90 {calib.quantile(errors, 0.9):.1f}%; "
        f"bandwidth {profile.memory_bandwidth_gbs:.1f} GB/s, fp32 GEMM {profile.compute_tflops:.3f} TFLOPS, "
        f"efficiency prefill {profile.efficiency.prefill:.2f} decode {profile.efficiency.decode:.2f}"
    )
    return "\n".join(rows)


def cmd_profile(args: argparse.Namespace) -> int:
    out = Path(args.out)
    problem = out_problem(out)
    if problem:
        print(f"error: --out {out}: {problem}; nothing written", file=sys.stderr)
        return 2
    try:
        base = load_profile(args.base_profile)
    except ProfileError as exc:
        print(f"error: --base-profile: {exc}; nothing written", file=sys.stderr)
        return 2
    from edge_agent import profiler  # lazy: imports torch (see the module docstring)
    from models.runtime import load

    t0 = time.perf_counter()
    loaded = load(args.model, quant=args.quant)  # models' errors (unknown model...): main prints them, exit 2
    print(f"loaded {args.model} ({args.quant}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    grid = profiler.QUICK if args.quick else profiler.FULL
    profile = profiler.profile_device(
        loaded, args.model, args.quant, args.engine, base, grid=grid, progress=progress_printer()
    )
    print(summary(profile, profiler.model_cost(loaded), base))
    try:
        profiler.write_profile(profile, out)
    except ProfileError as exc:
        print(f"error: {exc}; nothing written", file=sys.stderr)
        return 2
    use = f"tandem agent run --profile {os.fspath(out)} --model {args.model} --quant {args.quant}"
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s; serve with it: {use} ...")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help=HELP, description=HELP)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name, .gguf path or bundle (default {DEFAULT_MODEL})")
    quant_help = "precision to serve and measure it at (default: source, each tensor at the GGUF's own precision)"
    p.add_argument("--quant", choices=["source", "fp32", "int8", "int4"], default="source", help=quant_help)
    p.add_argument("--engine", choices=["cpu"], default="cpu", help="what computes it (cpu: our kernels)")
    p.add_argument("--base-profile", default="cpu-2core", help="profile (name or file) to start from (cpu-2core)")
    p.add_argument("--out", default="my-device.yaml", help="profile file to write (default my-device.yaml)")
    p.add_argument("--quick", action="store_true", help="the 8-sample start-up calibration only (a few seconds)")
    p.set_defaults(func=cmd_profile)
