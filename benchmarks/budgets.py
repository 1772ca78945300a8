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


def reference_costs(client, placements: list[str], prompts: list[tuple[str, int]]) -> dict:
    """Per placement: (prompt tokens, TTFT ms) points, mean TPOT ms and energy per token, measured at
    the caller with the request pinned there (best effort)."""
    from tandem import Budget

    out: dict[str, dict] = {}
    for p in placements:
        points, tpots, energies = [], [], []
        for text, n in prompts:
            sent = time.perf_counter()
            stream = client.generate(text, stream=True, max_tokens=32, budget=Budget(best_effort=True), device=p)
            times = [time.perf_counter() for _ in stream]
            points.append((n, (times[0] - sent) * 1000))
            tpots.append((times[-1] - times[0]) * 1000 / max(1, len(times) - 1))
            energies.append(stream.result.energy_j / max(1, stream.result.completion_tokens))
        out[p] = {"ttft": sorted(points), "tpot": sorted(tpots)[len(tpots) // 2], "energy": max(energies)}
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


def p_meet(req: Request, ref: dict, noise: tuple[list[float], list[float]]) -> float:
    """Probability that one run of `req` on a placement of mean costs `ref` (reference_costs) meets
    every limit it set, when its TTFT and time per token are those means times ratios drawn from
    `noise` (measured over predicted TTFT and TPOT), independently; energy follows time per token."""
    ttft_ratios, tpot_ratios = noise
    if not ttft_ratios or not tpot_ratios:
        return 0.0
    ttft = interpolate(ref["ttft"], req.prompt_tokens)
    ok_ttft = sum(not req.ttft_ms or ttft * r <= req.ttft_ms for r in ttft_ratios) / len(ttft_ratios)
    ok_rest = sum(
        (not req.tpot_ms or ref["tpot"] * r <= req.tpot_ms)
        and (not req.energy_j or ref["energy"] * req.max_tokens * r <= req.energy_j)
        for r in tpot_ratios
    ) / len(tpot_ratios)
    return ok_ttft * ok_rest


def oracle(requests: list[Request], refs: dict, noise: dict, q: float) -> dict:
    """What an admission that knew each placement's mean cost (the warm-up's, around which the
    budgets were drawn) and its noise exactly (`noise`: per placement, this run's ratios) would do
    with these requests at quantile `q`: admit where some placement meets every limit with
    probability >= q, there. Expected figures, as the benchmark counts them: the share of admitted
    requests that keep their budgets, and the share of rejected ones that one run on each placement
    would find feasible somewhere (1 - prod(1 - P(meet)))."""
    kept, feasible, admitted = 0.0, 0.0, 0
    for req in requests:
        p = [p_meet(req, refs[name], noise[name]) for name in sorted(refs)]
        if max(p) >= q:
            admitted += 1
            kept += max(p)
        else:
            feasible += 1 - math.prod(1 - x for x in p)
    rejected = len(requests) - admitted
    return {
        "quantile": q,
        "admitted": admitted,
        "kept_rate": round(kept / admitted, 4) if admitted else 0.0,
        "rejected_feasible_rate": round(feasible / rejected, 4) if rejected else 0.0,
    }


def measured_noise(fleet: Fleet) -> dict[str, tuple[list[float], list[float]]]:
    """Per placement name: the hub's ratios of measured over predicted TTFT and time per token, as its
    registry holds them now (at most SAVE_EVERY_S behind)."""
    from cloud_hub.calibrations import Calibrations
    from cloud_hub.store import SQLiteStore

    cals = Calibrations(SQLiteStore(fleet.work / "hub" / "registry.db"))
    out = {}
    for device in ["cloud", *fleet.ids()]:
        t = cals.get(device, CLOUD_MODEL if device == "cloud" else EDGE_MODEL)
        out[fleet.names.get(device, device)] = (list(t.ttft.ratios or ()), list(t.tpot.ratios or ()))
    return out


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
    noise: dict[str, tuple[list[float], list[float]]] = {}
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
            if calibrated:
                noise = measured_noise(fleet)
        results[name] = summary(outcomes)
        log(f"   {name}: {json.dumps(results[name])}")
    # The best any admission could do with these budgets on this host's noise (the calibrated hub's).
    oracles = [oracle(requests, refs, noise, q) for q in sorted({0.5, 0.8, args.quantile})] if noise else []
    headline = {
        "requests": args.requests,
        "quantile": args.quantile,
        "cpu": cpu_model(),
        "minutes": round((time.time() - started) / 60, 1),
        **{f"{k}_{name}": v for name, r in results.items() for k, v in r.items() if k != "by_placement"},
        "placements": {name: r["by_placement"] for name, r in results.items()},
        "oracle": oracles,
        "noise_p95": {name: [round(quantile(r, 0.95), 3) for r in pair if r] for name, pair in noise.items()},
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
            "An admission that knew each placement's mean cost (the warm-up's, around which the budgets were drawn) "
            "and its noise exactly (the calibrated hub's ratios of measured to predicted TTFT and time per token, per "
            "placement), on the same requests; expected figures:",
            "",
            "| oracle quantile | admitted | kept (of admitted) | rejected but feasible somewhere |",
            "|---|---|---|---|",
            *(
                f"| {o['quantile']} | {o['admitted']} | {100 * o['kept_rate']:.1f}% | "
                f"{100 * o['rejected_feasible_rate']:.1f}% |"
                for o in oracles
            ),
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
