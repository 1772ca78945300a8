"""MoE²'s serving overhead in the hub per feature kind, and the gate's held-out quality per kind.

    python benchmarks/moe2_overhead.py [--json] [--write-docs] [--reps 30] [--no-quality]

Quality: for each kind (partitioner.moe2.features.KINDS) a gate trained as `tandem experts train`
trains it (seed 0, weight decay cross-validated on the calibration requests, subset dropout 0.5) on
the 200 calibration requests' features, measured on the 100 held-out requests (gate_measures.held_out): the
mixture's expected loss, k = 1 routing to the gate's top expert, and references (bits per byte).
"prior top-1" routes every request to the top expert of the gate's mean calibration weights: what
the hub did before it read prompts. Losses and features come from the MoE² cache (the first run
computes them: about half an hour on two cores).

Overhead: what the hub records in tandem_moe2_overhead_seconds (cloud_hub.metrics): the time of
Moe2Router.choose from its call to its choice, features and gate included, with each kind's trained
gate and its expert table, over a fleet of 10 candidates on 6 device profiles (9 of them experts), at
k = 1 and an unconstrained budget (its selection cached after the first request, as a hub's is for a
recurring budget). Prompts of 16 to 512 SmolLM2 tokens cut from held-out documents; medians and 95th
percentiles of --reps requests each, after one warm-up. "prior" is the router without a gate. The
features alone (features.prompt_vector) are timed too. One torch thread by default (--threads): on two
cores shared with other work, torch's two threads wait on each other for a descheduled one, and the
slow kinds' figures then swing tenfold between runs ("embed" is numpy, single-threaded either way).
Target (issue 17): under 5 ms a request.

With --no-quality the gates are random (seeded) over the same experts and dimensions: the overhead
does not depend on the gate's values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402
from cloud_hub.candidates import Candidate  # noqa: E402
from cloud_hub.moe2_gate import PromptGate  # noqa: E402
from cloud_hub.moe2_router import Moe2Router  # noqa: E402
from cloud_hub.prompt import prompt_from_value  # noqa: E402
from cloud_hub.router import Budget  # noqa: E402
from device_profiles import load_profile  # noqa: E402
from models import zoo  # noqa: E402
from models.corpus import documents  # noqa: E402
from models.embeddings import Embedder  # noqa: E402
from models.gguf_loader import open_gguf, read_config  # noqa: E402
from partitioner.cost import ModelCost  # noqa: E402
from partitioner.moe2.dataset import GEMMA, SMOLLM, VARIANTS, PromptSpec  # noqa: E402
from partitioner.moe2.features import KINDS, TokenEmbedder, feature_embedder, prepare_split, prompt_vector  # noqa: E402
from partitioner.moe2.gate import Gate, GateConfig, GateManifest, GateNet, checksum, train_gate  # noqa: E402
from partitioner.moe2.gate_measures import (  # noqa: E402
    choose_weight_decay,
    held_out,
    optimality_gaps,
    random_subsets,
    routed_loss,
)
from partitioner.moe2.table import ExpertTable  # noqa: E402

SIZES = (16, 64, 128, 256, 512)
"""Prompt lengths in SmolLM2 tokens."""
TARGET_MS = 5.0
BITS = {"fp32": 32.0, "int8": 8.5, "int4": 4.5, "source": 5.0}
FLEET = (
    ("edge", "pi", "raspberry-pi-5", SMOLLM, "int4"),
    ("edge", "nano", "jetson-orin-nano", SMOLLM, "int8"),
    ("edge", "nano", "jetson-orin-nano", GEMMA, "int4"),
    ("edge", "orin", "jetson-agx-orin", SMOLLM, "fp32"),
    ("edge", "orin", "jetson-agx-orin", GEMMA, "int8"),
    ("edge", "laptop", "x86-laptop-cpu", SMOLLM, "source"),
    ("edge", "laptop", "x86-laptop-cpu", GEMMA, "int4"),
    ("edge", "rtx", "rtx-3060", SMOLLM, "fp32"),
    ("edge", "rtx", "rtx-3060", "unknown-model", "fp32"),  # a model the gate does not know: not an expert
    ("cloud", "", "cloud-h100", GEMMA, "source"),
)
"""(kind, device, profile, model, quant) of each candidate."""


@dataclass(frozen=True)
class Quality:
    """One kind's gate on the held-out requests, bits per byte."""

    kind: str
    dims: int
    weight_decay: float
    gate_expected: float
    gate_routed: float
    prior_routed: float
    best_single: float
    uniform: float
    oracle: float
    routed_gap: float
    """The worst top-1 gap over SUBSETS random subsets: the restricted full-set gate against one retrained."""
    mean_gap: float
    """The expected-loss gap averaged over those subsets."""
    gain_ci: tuple[float, float]
    """95% paired-bootstrap interval of the top-1 gain over the best single expert (best_single - gate_routed)."""


SUBSETS = 5
"""Random subsets of the optimality test (gate_measures.optimality_gaps), as tandem experts train runs it."""


def fleet() -> list[Candidate]:
    """FLEET as the hub's candidates, idle, each costed from its model's GGUF config."""
    configs = {m: read_config(open_gguf(zoo.resolve(m))) for m in (SMOLLM, GEMMA)}
    out = []
    for kind, device, profile, model, quant in FLEET:
        cost = ModelCost.from_config(configs.get(model, configs[SMOLLM]), bits_per_weight=BITS[quant])
        out.append(Candidate(kind, device, load_profile(profile), model, cost, quant=quant))
    return out


def prompts(embedder: TokenEmbedder) -> dict[int, str]:
    """Per size, the first that many SmolLM2 tokens of the held-out documents' text."""
    text = "\n\n".join(d.text for d in documents("eval")[:8])
    ids = embedder.encode(text, add_special_tokens=False)
    return {n: embedder.decode(ids[:n]) for n in SIZES}


def trained(kind: str) -> tuple[Gate, ExpertTable, Quality]:
    """`kind`'s gate as `tandem experts train` trains it, its table, and its held-out figures."""
    cal = prepare_split("calibration", PromptSpec(200), kind)
    ev = prepare_split("eval", PromptSpec(100), kind)
    mat, cfg = cal.matrix, GateConfig()
    wd = choose_weight_decay(cal.features, mat.losses, mat.expert_ids, kind, cfg)
    gate = train_gate(cal.features, mat.losses, mat.expert_ids, kind, GateConfig(weight_decay=wd))
    table = ExpertTable(mat.expert_ids, mat.tokenizers, gate.weights(cal.features), mat.losses, mat.n_bytes)
    fig = held_out(gate, ev.features, ev.matrix.losses)
    prior = np.tile(table.prior, (len(ev.requests), 1))
    subsets = random_subsets(len(mat.expert_ids), SUBSETS, seed=0)
    gaps = optimality_gaps(gate, (cal.features, mat.losses), (ev.features, ev.matrix.losses), subsets)
    quality = Quality(kind, gate.manifest.dims, wd, fig.gate_expected, fig.gate_routed,
                      routed_loss(prior, ev.matrix.losses), fig.best_single, fig.uniform, fig.oracle,
                      max(g.routed_gap for g in gaps), float(np.mean([g.gap for g in gaps])),
                      gain_interval(gate, ev.features, ev.matrix.losses))  # fmt: skip
    return gate, table, quality


def gain_interval(gate: Gate, features: np.ndarray, losses: np.ndarray, draws: int = 2000) -> tuple[float, float]:
    """95% interval of the mean per-request gain of top-1 routing over the best single expert, by a paired
    bootstrap over the held-out requests (seeded)."""
    rows = np.arange(len(losses))
    gain = losses[:, int(np.argmin(losses.mean(axis=0)))] - losses[rows, gate.weights(features).argmax(axis=1)]
    means = [gain[np.random.default_rng(i).integers(0, len(gain), len(gain))].mean() for i in range(draws)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def random_gate(kind: str, dims: int, seed: int = 0) -> tuple[Gate, ExpertTable]:
    """A seeded random linear gate over VARIANTS and a random table of 200 requests (--no-quality)."""
    rng = np.random.default_rng(seed)
    ids = tuple(v.id for v in VARIANTS)
    net = GateNet(dims, len(ids), 0)
    net.body[0].weight.data = net.body[0].weight.data.new_tensor(rng.normal(size=(len(ids), dims)))
    manifest = GateManifest(ids, kind, dims, GateConfig())
    gate = Gate(GateManifest(**{**manifest.__dict__, "checksum": checksum(net)}), net)
    weights = rng.dirichlet(np.ones(len(ids)), size=200)
    table = ExpertTable(ids, tuple(v.family for v in VARIANTS), weights, rng.uniform(0.8, 2.0, (200, len(ids))),
                        rng.uniform(50, 200, 200))  # fmt: skip
    return gate, table


def timed(router: Moe2Router, candidates: list[Candidate], text: str, reps: int) -> list[float]:
    """Milliseconds of `reps` choices of one prompt, as the router observes them (after a warm-up)."""
    took: list[float] = []
    router.observe = lambda seconds, _source: took.append(seconds * 1000)
    prompt = prompt_from_value(text)
    for _ in range(reps + 1):
        router.choose(candidates, prompt.routing_tokens, 32, Budget(), prompt=prompt)
    return took[1:]


def features_ms(embedder: Embedder, text: str, reps: int) -> float:
    prompt_vector(embedder, text)
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        prompt_vector(embedder, text)
        runs.append((time.perf_counter() - start) * 1000)
    return statistics.median(runs)


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95))


def measure(kinds: tuple[str, ...], reps: int, quality: bool) -> tuple[list[dict], list[Quality]]:
    candidates = fleet()
    texts = prompts(TokenEmbedder(SMOLLM))
    rows: list[dict] = []
    qualities: list[Quality] = []
    for kind in (None, *kinds):
        embedder, gate = None, None
        if kind is None:  # the router without a gate: the prior
            _, table = random_gate("embed", 8)
            load_s = 0.0
        else:
            start = time.perf_counter()
            embedder = feature_embedder(kind)
            load_s = time.perf_counter() - start
            if quality:
                g, table, q = trained(kind)
                qualities.append(q)
            else:
                g, table = random_gate(kind, embedder.dimensions)
            gate = PromptGate(g, table, embedder)
        router = Moe2Router(table, gate=gate)
        for text in texts.values():  # warm-up: a model's first calls at a new length are slower
            router.choose(candidates, 64, 32, Budget(), prompt=prompt_from_value(text))
        for n, text in texts.items():
            runs = timed(router, candidates, text, reps if kind != "hidden" else max(3, reps // 10))
            row = {"features": kind or "prior", "tokens": n, "median_ms": statistics.median(runs), "p95_ms": p95(runs)}
            if embedder is not None:
                row["features_ms"] = features_ms(embedder, text, max(3, reps // 10) if kind == "hidden" else reps)
            row["load_s"] = load_s
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows, qualities


def overhead_table(rows: list[dict]) -> str:
    kinds = list(dict.fromkeys(r["features"] for r in rows))
    head = "| prompt tokens | " + " | ".join(f"{k} median (p95)" for k in kinds) + " |"
    lines = [head, "|---|" + "---|" * len(kinds)]
    for n in SIZES:
        cells = [next(r for r in rows if r["features"] == k and r["tokens"] == n) for k in kinds]
        lines.append(f"| {n} | " + " | ".join(f"{c['median_ms']:.2f} ({c['p95_ms']:.2f})" for c in cells) + " |")
    return "\n".join(lines)


def quality_table(qualities: list[Quality]) -> str:
    lines = [
        "| features | dims | weight decay | gate mixture | gate top-1 | prior top-1 | best single | uniform | oracle "
        "| top-1 gain over best single, 95% CI | subsets: worst top-1 gap | mean gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for q in qualities:
        lines.append(
            f"| {q.kind} | {q.dims} | {q.weight_decay:g} | {q.gate_expected:.4f} | {q.gate_routed:.4f} | "
            f"{q.prior_routed:.4f} | {q.best_single:.4f} | {q.uniform:.4f} | {q.oracle:.4f} | "
            f"{q.best_single - q.gate_routed:+.4f} [{q.gain_ci[0]:+.4f}, {q.gain_ci[1]:+.4f}] | {q.routed_gap:+.4f} | "
            f"{q.mean_gap:+.4f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict], qualities: list[Quality]) -> dict:
    """Per kind: the worst median overhead over the prompt sizes, whether it meets the target, the
    features' load time, and the held-out figures."""
    out: dict = {"target_ms": TARGET_MS, "kinds": {}}
    for kind in dict.fromkeys(r["features"] for r in rows):
        mine = [r for r in rows if r["features"] == kind]
        worst = max(r["median_ms"] for r in mine)
        out["kinds"][kind] = {"worst_median_ms": round(worst, 3), "meets_target": worst < TARGET_MS,
                              "load_s": round(mine[0]["load_s"], 2)}  # fmt: skip
    for q in qualities:
        out["kinds"][q.kind].update({k: round(v, 4) for k, v in asdict(q).items() if isinstance(v, float)})
        out["kinds"][q.kind]["gain_ci"] = [round(v, 4) for v in q.gain_ci]
    return out


def verdict(head: dict, qualities: list[Quality]) -> str:
    """What the figures say: which kinds meet the target, and which gates beat the best single expert
    beyond the bootstrap's noise."""
    kinds = {k: v for k, v in head["kinds"].items() if k != "prior"}
    fast = [k for k, v in kinds.items() if v["meets_target"]]
    slow = [f"{k} ({v['worst_median_ms']:.0f} ms)" for k, v in kinds.items() if not v["meets_target"]]
    text = (
        f"Within {TARGET_MS:g} ms at every prompt length: {', '.join(fast) or 'none'}; worst medians over the "
        f"target: {', '.join(slow) or 'none'}."
    )
    if qualities:
        sure = [q.kind for q in qualities if q.gain_ci[0] > 0]
        gains = ", ".join(f"{q.kind} {q.best_single - q.gate_routed:+.4f}" for q in qualities)
        text += (
            f" Top-1 gains over the best single expert (bits per byte): {gains}; beyond the bootstrap's noise: "
            f"{', '.join(sure) or 'none, on 100 held-out requests'}."
        )
    return text


def cuts(rows: list[dict]) -> str:
    """Why a cheaper cut of a slow kind (fewer tokens, fewer layers) would not meet the target either."""
    at16 = {r["features"]: r["median_ms"] for r in rows if r["tokens"] == SIZES[0]}
    if "minilm" not in at16 or "hidden" not in at16:
        return ""
    return (
        f"Cheaper cuts of the slow kinds would miss the target too: MiniLM over a prompt's first {SIZES[0]} "
        f"tokens takes {at16['minilm']:.0f} ms, and SmolLM2 {at16['hidden'] / 30:.1f} ms a layer at {SIZES[0]} "
        "tokens (hidden's row over its 30 layers)."
    )


def write_docs(rows: list[dict], qualities: list[Quality], head: dict, reps: int) -> None:
    from edge_agent.measurements import cpu_name

    quality = (
        "Held-out gate quality (100 evaluation requests, bits per byte, lower is better; 200 calibration "
        "requests trained each gate as `tandem experts train` does):\n\n" + quality_table(qualities) + "\n\n"
        if qualities
        else "Gates random (--no-quality): overhead only.\n\n"
    )
    body = (
        "## MoE² serving overhead per feature kind (issue 17)\n\n"
        f"Command: `{command_line()}`  \nMachine: {cpu_name()}, 2 cores shared, {torch.get_num_threads()} torch "
        "thread(s). What the hub "
        "records in `tandem_moe2_overhead_seconds`: `Moe2Router.choose` from its call to its choice (10 "
        "candidates weighed, 9 of them experts; the selection from the cache; the prompt's features and the "
        f"gate), k = 1, unconstrained budget. Milliseconds, median (95th percentile) of {reps} requests per "
        "prompt (hidden: a tenth of them), prompts cut from held-out documents. **prior** is the router "
        f"without a gate (the gate's mean weights for every prompt). Target: under {TARGET_MS:g} ms.\n\n"
        + overhead_table(rows)
        + "\n\n"
        + quality
        + "**gate top-1** is what the hub serves at k = 1 (each request to the gate's top expert); **prior "
        "top-1** every request to the prior's top expert, what the hub did before it read prompts; the gain's "
        "interval is a paired bootstrap over the held-out requests. **subsets**: the full-set gate restricted "
        "to 5 random subsets against gates retrained on them (MoE²'s claim; gate_measures.optimality_gaps).\n\n"
        + verdict(head, qualities)
        + "\n\nTried and rejected for a cheap kind (same splits and training, ad hoc): mean and deviation "
        "pooled together, max pooling, frequency-weighted pooling (SIF, token frequencies of the calibration "
        "documents) with and without its first principal component removed, and text statistics (bytes per "
        "token, digits, punctuation, capitals, newlines) alone or beside the mean: no top-1 figure left the "
        "bootstrap interval of plain mean pooling. " + cuts(rows) + "\n\n"
        f"```json\n{json.dumps(head)}\n```\n"
    )
    write_block("moe2_overhead", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=30, help="measured requests per prompt size (hidden: a tenth)")
    p.add_argument("--kinds", default=",".join(KINDS), help="feature kinds to measure, comma-separated")
    p.add_argument("--no-quality", action="store_true", help="random gates: overhead only, no losses needed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the module docstring)")
    p.add_argument("--json", action="store_true", help="print one JSON line of headline figures")
    p.add_argument("--write-docs", action="store_true", help="update this benchmark's section of docs/benchmarks.md")
    args = p.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    torch.set_num_threads(args.threads)
    rows, qualities = measure(kinds, args.reps, not args.no_quality)
    head = summary(rows, qualities)
    if args.write_docs:
        write_docs(rows, qualities, head, args.reps)
    print(json.dumps(head) if args.json else overhead_table(rows) + "\n\n" + quality_table(qualities))


if __name__ == "__main__":
    main()
