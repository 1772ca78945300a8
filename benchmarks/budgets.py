"""Budgets kept: how often an admitted request meets every budget it set, measured at the caller.

A hub serving the cloud model (Gemma 3 270M) and real agents on this machine (not emulated: SmolLM2
at its source precision, and SmolLM2 at int8), each started as `make run` starts them. Requests go
one at a time: prompts of real held-out text from 16 to 1,024 tokens, outputs of 8 to 128 tokens,
and budgets (TTFT, time per token, edge energy, or several) drawn at random around what the
placements were measured to cost in a warm-up pinned to each of them.

For each admitted request: did it meet every limit it set, timed at the caller (TTFT to the first
streamed token, TPOT over the rest; energy as the answer reports it)? For each rejected request:
would it have met its budget anywhere? Each is run again, pinned to every placement with best
effort. Twice, with the same requests: with the hub's calibration (the devices' measured costs,
online refits, quantile admission) and without it (the profiles' roofline, mean admission).

Beside them, an oracle (`oracle`): what an admission that knew each placement's costs and the spread
of one run (the warm-up's repeats, timed here) would admit, keep and refuse wrongly at quantiles 0.5,
0.8 and the hub's, and how many of the hub's own rejections its model expects to be feasible
against how many were: how far the two targets can be met at once with these budgets on this host.

    python benchmarks/budgets.py [--requests 200] [--quantile 0.95] [--json] [--write-docs]

The cloud is profiled first (`tandem profile --quick`); agents calibrate themselves as they start.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402
from benchmarks.edge_decode import cpu_model  # noqa: E402
from partitioner.calibration import quantile  # noqa: E402
from scripts.fleet import Fleet  # noqa: E402

CLOUD_MODEL, EDGE_MODEL = "gemma3-270m", "smollm2-135m-instruct"
AGENTS = [("edge-source", "source"), ("edge-int8", "int8")]  # (name, quant), both profile cpu-2core
KINDS = ("ttft", "tpot", "energy", "ttft+tpot", "all")
NOISE = ("ttft", "tpot")
"""The ratios of one run to its prompt's medians, in reference_costs' "noise" pairs."""


@dataclass(frozen=True)
class Request:
    prompt: str
    prompt_tokens: int
    max_tokens: int
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    energy_j: float = 0.0


@dataclass(frozen=True)
class Outcome:
    admitted: bool
    kept: bool
    """Admitted: met every limit set. Rejected: met them on some placement when run there."""
    placement: str
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    energy_j: float = 0.0
    predicted_ttft_ms: float = 0.0
    predicted_tpot_ms: float = 0.0
    error: str = ""


def texts(tokens: list[int], tokenizer, n: int, rng: random.Random) -> tuple[str, int]:
    """A window of `n` tokens of held-out text, decoded back to text (and its true token count)."""
    start = rng.randrange(0, max(1, len(tokens) - n))
    text = tokenizer.decode(tokens[start : start + n])
    return text, len(tokenizer.encode(text))


def measure(client, req: Request, device: str = "", best_effort: bool = False):
    """Send one request, streaming; returns (result, ttft_ms, tpot_ms) timed here, at the caller."""
    from tandem import Budget

    budget = Budget(req.ttft_ms, req.tpot_ms, req.energy_j, best_effort)
    sent = time.perf_counter()
    stream = client.generate(req.prompt, stream=True, max_tokens=req.max_tokens, budget=budget, device=device)
    times = [time.perf_counter() for _ in stream]
    ttft = (times[0] - sent) * 1000 if times else math.inf
    tpot = (times[-1] - times[0]) * 1000 / (len(times) - 1) if len(times) > 1 else 0.0
    return stream.result, ttft, tpot


def met(req: Request, ttft: float, tpot: float, energy: float) -> bool:
    return (
        (not req.ttft_ms or ttft <= req.ttft_ms)
        and (not req.tpot_ms or tpot <= req.tpot_ms)
        and (not req.energy_j or energy <= req.energy_j)
    )


REPEATS = 5
"""Runs of each warm-up prompt on each placement: their medians are the costs budgets are drawn
around, their spread the noise the oracle knows."""


def reference_costs(client, placements: list[str], prompts: list[tuple[str, int]], repeats: int = REPEATS) -> dict:
    """Per placement, each prompt run `repeats` times pinned there with best effort (after one
    unrecorded run: a placement's first answer is slower), timed at the caller:

    - "ttft": (prompt tokens, median TTFT ms) points; "tpot": the median time per token, ms;
    - "energy": the largest energy per token of any run, J (the scale energy budgets are drawn on);
    - "power_w": the median of energy over the time from the request to its last token (an agent
      estimates energy as its power x that time; 0 for the cloud, whose energy is not the edge's);
    - "noise": each run's (TTFT, time per token) over its prompt's medians: the spread of one run."""
    from tandem import Budget

    def run(p: str, text: str) -> tuple[float, float, float, float]:
        sent = time.perf_counter()
        stream = client.generate(text, stream=True, max_tokens=32, budget=Budget(best_effort=True), device=p)
        times = [time.perf_counter() for _ in stream]
        ttft, tpot = (times[0] - sent) * 1000, (times[-1] - times[0]) * 1000 / max(1, len(times) - 1)
        energy = stream.result.energy_j
        watts = energy / ((times[-1] - sent) or 1e-9)
        return ttft, tpot, energy / max(1, stream.result.completion_tokens), watts

    out: dict[str, dict] = {}
    for p in placements:
        run(p, prompts[0][0])
        points, tpots, energies, powers, noise = [], [], [], [], []
        for text, n in prompts:
            runs = [run(p, text) for _ in range(repeats)]
            ttft, tpot = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            points.append((n, ttft))
            tpots += [r[1] for r in runs]
            energies += [r[2] for r in runs]
            powers += [r[3] for r in runs]
            noise += [(r[0] / ttft, r[1] / tpot) for r in runs]
        out[p] = {
            "ttft": sorted(points),
            "tpot": statistics.median(tpots),
            "energy": max(energies),
            "power_w": statistics.median(powers),
            "noise": noise,
        }
    return out


def interpolate(points: list[tuple[int, float]], n: int) -> float:
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if n <= x1:
            return y0 + (y1 - y0) * max(0.0, n - x0) / max(1, x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) * (n - x1) / max(1, x1 - x0)


def draw(rng: random.Random, refs: dict, tokens: list[int], tokenizer, count: int) -> list[Request]:
    """`count` requests: lengths log-uniform in [16, 1024], outputs uniform in [8, 128], budgets a
    random placement's measured cost x U(0.6, 1.8) on one or more of TTFT, TPOT and energy."""
    reqs = []
    for _ in range(count):
        n = int(math.exp(rng.uniform(math.log(16), math.log(1024))))
        text, n = texts(tokens, tokenizer, n, rng)
        m = rng.randint(8, 128)
        ref = refs[rng.choice(sorted(refs))]
        kind = rng.choice(KINDS)
        f = lambda: rng.uniform(0.6, 1.8)  # noqa: E731
        ttft = interpolate(ref["ttft"], n) * f() if kind in ("ttft", "ttft+tpot", "all") else 0.0
        tpot = ref["tpot"] * f() if kind in ("tpot", "ttft+tpot", "all") else 0.0
        energy = ref["energy"] * m * f() if kind in ("energy", "all") and ref["energy"] > 0 else 0.0
        if not (ttft or tpot or energy):
            ttft = interpolate(ref["ttft"], n) * f()
        reqs.append(Request(text, n, m, round(ttft, 1), round(tpot, 2), round(energy, 3)))
    return reqs


def p_meet(req: Request, ref: dict) -> float:
    """Share of `ref`'s noise (reference_costs) under which one run of `req` there meets every limit
    it set: TTFT the median at its length x the run's TTFT ratio, time per token the median x the
    same run's ratio (paired, as one run has them), energy the placement's power x the time to its
    last token (max_tokens of them)."""
    if not ref["noise"]:
        return 0.0
    base = interpolate(ref["ttft"], req.prompt_tokens)
    ok = 0
    for r_ttft, r_tpot in ref["noise"]:
        ttft, tpot = base * r_ttft, ref["tpot"] * r_tpot
        ok += met(req, ttft, tpot, ref["power_w"] * (ttft + (req.max_tokens - 1) * tpot) / 1000)
    return ok / len(ref["noise"])


def feasible_somewhere(req: Request, refs: dict, meets: list[float] | None = None) -> float:
    """Probability that one run on each placement meets `req`'s budget on at least one, the runs
    taken as independent (back to back on one host they are not quite: a slow minute slows all).
    `meets`: each placement's p_meet, where the caller has them already."""
    meets = [p_meet(req, ref) for ref in refs.values()] if meets is None else meets
    return 1 - math.prod(1 - p for p in meets)


def oracle(requests: list[Request], refs: dict, q: float) -> dict:
    """What an admission that knew each placement's costs and one run's spread as the warm-up measured
    them (`refs`: the medians budgets were drawn around, and `noise`) would do with these requests at
    quantile `q`: admit where some placement meets every limit with probability >= q, there.
    Expected figures, counted as the benchmark counts them: the share of admitted requests that keep
    their budgets, and the share of rejected ones found feasible by one run on each placement."""
    kept, feasible, admitted = 0.0, 0.0, 0
    for req in requests:
        meets = [p_meet(req, ref) for ref in refs.values()]
        if max(meets) >= q:
            admitted += 1
            kept += max(meets)
        else:
            feasible += feasible_somewhere(req, refs, meets)
    rejected = len(requests) - admitted
    return {
        "quantile": q,
        "admitted": admitted,
        "kept_rate": round(kept / admitted, 4) if admitted else 0.0,
        "rejected_feasible_rate": round(feasible / rejected, 4) if rejected else 0.0,
    }


def run_pass(fleet: Fleet, requests: list[Request], placements: list[str], log) -> list[Outcome]:
    from tandem import BudgetUnsatisfiable, Client

    out = []
    with Client(fleet.address, api_key=fleet.api_key, timeout=300) as client:
        for i, req in enumerate(requests):
            try:
                result, ttft, tpot = measure(client, req)
            except BudgetUnsatisfiable as exc:
                runs = [measure(client, req, device=p, best_effort=True) for p in placements]
                anywhere = any(met(req, t, tp, r.energy_j) for r, t, tp in runs)
                out.append(Outcome(False, anywhere, "rejected", error=str(exc)[:200]))
            else:
                p = result.placement
                where = fleet.names.get(p.device_id, p.device_id) if p.device_id else "cloud"
                kept = met(req, ttft, tpot, result.energy_j)
                out.append(
                    Outcome(True, kept, where, ttft, tpot, result.energy_j, p.predicted_ttft_ms, p.predicted_tpot_ms)
                )
            o = out[-1]
            log(
                f"  {i + 1:>3}/{len(requests)} prompt {req.prompt_tokens:>4} out {req.max_tokens:>3} budget "
                f"ttft {req.ttft_ms:>7.1f} tpot {req.tpot_ms:>6.2f} energy {req.energy_j:>6.3f}: "
                + (
                    f"{o.placement:<11} ttft {o.ttft_ms:>7.1f} (pred {o.predicted_ttft_ms:>7.1f}) "
                    f"tpot {o.tpot_ms:>6.2f} (pred {o.predicted_tpot_ms:>6.2f}) {'kept' if o.kept else 'MISSED'}"
                    if o.admitted
                    else f"rejected; {'would have met it somewhere' if o.kept else 'met nowhere'} ({o.error[:160]})"
                )
            )
    return out


def summary(outcomes: list[Outcome]) -> dict:
    admitted = [o for o in outcomes if o.admitted]
    rejected = [o for o in outcomes if not o.admitted]
    return {
        "requests": len(outcomes),
        "admitted": len(admitted),
        "kept": sum(o.kept for o in admitted),
        "kept_rate": sum(o.kept for o in admitted) / len(admitted) if admitted else 0.0,
        "rejected": len(rejected),
        "rejected_but_feasible": sum(o.kept for o in rejected),
        "rejected_feasible_rate": sum(o.kept for o in rejected) / len(rejected) if rejected else 0.0,
        "by_placement": {p: sum(o.placement == p for o in admitted) for p in sorted({o.placement for o in admitted})},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--quantile", type=float, default=0.95, help="the hub's admission quantile")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--passes", default="calibrated,uncalibrated", help="which hubs to run, in order")
    ap.add_argument("--json", action="store_true", help="print one JSON line of headline figures")
    ap.add_argument("--write-docs", action="store_true", help="write the section of docs/benchmarks.md")
    ap.add_argument("--quiet", action="store_true", help="no line per request")
    args = ap.parse_args()
    log = (lambda *_: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    from models.corpus import documents
    from models.runtime import load

    tok = load(EDGE_MODEL, prepare=False).tokenizer
    tokens = tok.encode("\n\n".join(d.text for d in documents("eval")[:40]))
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tandem-budgets-"))
    log(f"== profiling the cloud model ({CLOUD_MODEL}) on this host")
    cloud_profile = work / "cloud.yaml"
    subprocess.run(
        [sys.executable, "-m", "tandem_cli", "profile", "--quick", "--model", CLOUD_MODEL,
         "--base-profile", "cloud-cpu-2core", "--out", str(cloud_profile)],
        check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    requests: list[Request] = []
    results: dict[str, dict] = {}
    refs: dict[str, dict] = {}
    check: dict[str, float] = {}
    started = time.time()
    for name in args.passes.split(","):
        calibrated = name == "calibrated"
        extra = ["--admission-quantile", str(args.quantile)] + ([] if calibrated else ["--no-calibration"])
        log(f"== {name} hub")
        with Fleet(work / name, CLOUD_MODEL, str(cloud_profile), hub_args=extra, log=log) as fleet:
            for agent, quant in AGENTS:
                fleet.agent(agent, "cpu-2core", EDGE_MODEL, extra=["--quant", quant])
            fleet.wait_online()
            placements = ["cloud", *fleet.ids()]
            if not requests:  # drawn once, from the first pass's warm-up, and sent alike to both hubs
                from tandem import Client

                with Client(fleet.address, api_key=fleet.api_key, timeout=300) as client:
                    probes = [texts(tokens, tok, n, rng) for n in (16, 128, 512, 1024)]
                    by_id = reference_costs(client, placements, probes)
                refs = {fleet.names.get(k, k): v for k, v in by_id.items()}
                requests = draw(rng, refs, tokens, tok, args.requests)
                (work / "requests.json").write_text(json.dumps([asdict(r) for r in requests]))
                (work / "costs.json").write_text(json.dumps(refs))
            outcomes = run_pass(fleet, requests, placements, log)
        results[name] = summary(outcomes)
        if calibrated:  # the oracle's model checked on the requests this hub rejected
            rejected = [r for r, o in zip(requests, outcomes, strict=True) if not o.admitted]
            check = {
                "rejected": len(rejected),
                "measured_feasible": results[name]["rejected_but_feasible"],
                "expected_feasible": round(sum(feasible_somewhere(r, refs) for r in rejected), 1),
            }
        log(f"   {name}: {json.dumps(results[name])}")
    # What an admission knowing the costs and one run's spread could do with these budgets.
    oracles = [oracle(requests, refs, q) for q in sorted({0.5, 0.8, args.quantile})]
    headline = {
        "requests": args.requests,
        "quantile": args.quantile,
        "cpu": cpu_model(),
        "minutes": round((time.time() - started) / 60, 1),
        **{f"{k}_{name}": v for name, r in results.items() for k, v in r.items() if k != "by_placement"},
        "placements": {name: r["by_placement"] for name, r in results.items()},
        "oracle": oracles,
        "oracle_check": check,
        "noise_p95": {
            name: {kind: round(quantile([pair[k] for pair in ref["noise"]], 0.95), 3) for k, kind in enumerate(NOISE)}
            for name, ref in refs.items()
        },
    }
    table = [
        "| hub | admitted | kept (of admitted) | rejected | rejected but feasible somewhere |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        table.append(
            f"| {name} | {r['admitted']} | {r['kept']} ({100 * r['kept_rate']:.1f}%) | {r['rejected']} | "
            f"{r['rejected_but_feasible']} ({100 * r['rejected_feasible_rate']:.1f}%) |"
        )
    if oracles:
        table += [
            "",
            "An oracle admission on the same requests: it knows each placement's costs and the spread of one run as "
            f"the warm-up measured them ({REPEATS} runs of each of its prompts a placement, timed here: the medians "
            "the budgets were drawn around, each run's TTFT and time per token over them), and takes the runs on the "
            "placements as independent. Expected figures:",
            "",
            "| oracle quantile | admitted | kept (of admitted) | rejected but feasible somewhere |",
            "|---|---|---|---|",
            *(
                f"| {o['quantile']} | {o['admitted']} | {100 * o['kept_rate']:.1f}% | "
                f"{100 * o['rejected_feasible_rate']:.1f}% |"
                for o in oracles
            ),
        ]
    if check:
        table += [
            "",
            f"The oracle's model on the {check['rejected']} requests the calibrated hub rejected: it expects "
            f"{check['expected_feasible']} to be found feasible somewhere; {check['measured_feasible']} were.",
        ]
    print("\n".join(table))
    if args.json:
        print(json.dumps(headline))
    if args.write_docs:
        body = "\n".join(
            [
                "## Budgets kept (issue 22)",
                "",
                f"`{command_line()}` on {cpu_model()}: a hub serving {CLOUD_MODEL} itself, and real agents serving "
                f"{EDGE_MODEL} at source precision and at int8 (profile cpu-2core, not emulated), all on this host. "
                f"{args.requests} requests one at a time, the same requests for both hubs: real held-out text of "
                "16-1,024 tokens, 8-128 output tokens, budgets drawn around the placements' measured costs. Timed "
                "at the caller. A rejected request is run again on every placement with best effort to see whether "
                "it could have met its budget anywhere.",
                "",
                *table,
                "",
                "```json",
                json.dumps(headline),
                "```",
            ]
        )
        write_block("budgets", body)


if __name__ == "__main__":
    main()
