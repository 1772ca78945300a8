"""`tandem partition`: where to cut a model between an edge device and the cloud, with the figures.

The solver is partitioner.split.single_cut; this module reads the model's sizes from its GGUF header
(no weights loaded), checks the arguments, and prints the chosen cut beside edge-only (k = N) and
cloud-only (k = 0), or draws every cut's TTFT, time per token and edge energy (`--plot`).

The header read is slow (gguf.GGUFReader walks the tokenizer arrays field by field: about 3 s for
SmolLM2, 17 s for Gemma 3 270M on two cores) and imports torch for the served layout, so what it
yields, a `ModelCard`, is kept in the cache (`<cache>/cards/<key>.json`, the key naming the file's
path, size and mtime): a second call reads JSON and never imports torch. matplotlib (a dev
dependency) is imported only for `--plot`.

Units: bytes, milliseconds, joules; layer ranges are half-open [start, end).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from device_profiles import DeviceProfile, LinkSpec, ProfileError, list_profiles, load_profile
from device_profiles.links import load_link
from models import zoo
from models.config import ModelConfig
from partitioner.cost import MEMORY_HEADROOM, ModelCost, served_model_cost
from partitioner.split import BUDGETS, Plan, PlanError, Wire, evaluate, single_cut

CARD_FORMAT = 1
"""Version of a cached ModelCard (bump when what `_read_card` computes changes, e.g. models.source_quant's
layout): part of the cache key."""


@dataclass(frozen=True)
class ModelCard:
    """What the split solvers need of a model: its shape, and its weights' bytes as an agent serves it."""

    config: ModelConfig
    """The config models.runtime builds from the GGUF's metadata."""
    weight_bytes: int
    """Weights in memory at "source" precision (each tensor on the int4/int8 grid of its GGUF type,
    models.source_quant; norms and dense tensors fp32): what an agent advertises as ModelInfo.weight_bytes."""

    def cost(self) -> ModelCost:
        """The cost sizes the hub's router uses for this model as served (partitioner.cost.served_model_cost)."""
        return served_model_cost(self.config, self.weight_bytes)


@dataclass(frozen=True)
class Cut:
    """One cut k of the chain [edge, cloud]: its predicted figures and whether both stages fit in memory."""

    k: int
    """Edge runs layers [0, k), the cloud [k, N) and the head."""
    plan: Plan
    """partitioner.split.evaluate's figures for this k."""
    fits: bool
    """Every stage fits its device's memory with partitioner.cost.MEMORY_HEADROOM kept free."""


# -- the model card: config and served bytes from the GGUF header ------------------------------------------


def _read_card(path: Path) -> ModelCard:
    """The card of the GGUF at `path`, from its header and tensor table (nothing dequantized). Imports torch
    (models.source_quant, models.quant): only on a cache miss."""
    import torch

    from models.gguf_loader import open_gguf, parameter_name, read_config
    from models.quant import QuantLinear
    from models.source_quant import module_of, served_bits

    file = open_gguf(path)
    total = 0
    for t in file.reader.tensors:
        n = int(t.n_elements)
        bits = served_bits(t.tensor_type.name) if module_of(parameter_name(t.name)) else None
        if bits is None:  # norms, and tensors kept dense: fp32 parameters
            total += 4 * n
            continue
        cols = int(t.shape[0])  # GGUF lists dims innermost first: (in, out)
        with torch.device("meta"):  # the served layout's buffer shapes, nothing allocated
            total += QuantLinear.empty(n // cols, cols, bits, 32).nbytes()
    return ModelCard(read_config(file), total)


def _card_file(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{CARD_FORMAT}".encode()).hexdigest()
    return zoo.cache_dir() / "cards" / f"{key[:24]}.json"


@functools.lru_cache(maxsize=16)
def _card_at(path: Path, cache_file: Path) -> ModelCard:
    try:
        raw = json.loads(cache_file.read_text())
        return ModelCard(ModelConfig(**raw["config"]), int(raw["weight_bytes"]))
    except (OSError, ValueError, KeyError, TypeError):  # absent, or written by another version: read again
        pass
    card = _read_card(path)
    try:  # a cache that cannot be written costs the next call time, nothing else
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"config": dataclasses.asdict(card.config), "weight_bytes": card.weight_bytes}))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return card


def model_card(name_or_path: str | Path) -> ModelCard:
    """The card of a zoo model (pulled) or a GGUF file. Raises the models' TandemModelError family:
    UnknownModel, ModelNotPulled (the message says the pull command), GGUFError, UnsupportedArchitecture."""
    path = zoo.resolve(name_or_path)
    return _card_at(path, _card_file(path))


# -- the comparison ----------------------------------------------------------------------------------------


def _chain(edge: DeviceProfile, cloud: DeviceProfile) -> list[tuple[str, DeviceProfile]]:
    return [("edge", edge), ("cloud", cloud)]


def fits_memory(plan: Plan) -> bool:
    """Every stage of `plan` fits its device with MEMORY_HEADROOM free (the rule single_cut applies)."""
    return all(
        m <= (1 - MEMORY_HEADROOM) * s.profile.memory_gb * 1e9
        for s, m in zip(plan.stages, plan.memory_bytes, strict=True)
    )


def every_cut(
    edge: DeviceProfile, cloud: DeviceProfile, link: LinkSpec, cost: ModelCost, prompt: int, new: int, wire: Wire
) -> list[Cut]:
    """Every cut k = 0..N with its figures (partitioner.split.evaluate), in k order."""
    plans = [evaluate(_chain(edge, cloud), [link], cost, prompt, new, (k,), wire) for k in range(cost.n_layers + 1)]
    return [Cut(k, plan, fits_memory(plan)) for k, plan in enumerate(plans)]


def over_budget(plan: Plan, budgets: Mapping[str, float]) -> list[str]:
    """The budgets `plan` exceeds, each as "name value > limit" (budgets of 0 or None are no limit)."""
    values = {"ttft_ms": plan.ttft_ms, "tpot_ms": plan.tpot_ms, "energy_j": plan.edge_energy_j}
    return [f"{b} {values[b]:.4g} > {v:g}" for b, v in budgets.items() if v and values[b] > v]


# -- output ------------------------------------------------------------------------------------------------


def _stage_json(plan: Plan, n: int) -> list[dict]:
    return [
        {"device": s.device, "profile": s.profile.name, "start": s.start, "end": s.end, "head": s.end == n,
         "memory_bytes": m}
        for s, m in zip(plan.stages, plan.memory_bytes, strict=True)
    ]  # fmt: skip


def plan_json(plan: Plan, n: int, budgets: Mapping[str, float]) -> dict:
    """One plan as plain data: the cut, its stages, its figures, what fits and what it exceeds."""
    return {
        "k": plan.cuts[0],
        "stages": _stage_json(plan, n),
        "ttft_ms": plan.ttft_ms,
        "tpot_ms": plan.tpot_ms,
        "edge_energy_j": plan.edge_energy_j,
        "fits_memory": fits_memory(plan),
        "over_budget": over_budget(plan, budgets),
    }


def _plan_lines(label: str, plan: Plan | None, n: int, budgets: Mapping[str, float]) -> list[str]:
    if plan is None:
        return [f"{label:<11} none: see the error below"]
    notes = ([] if fits_memory(plan) else ["does not fit in memory"]) + over_budget(plan, budgets)
    head = (
        f"{label:<11} k={plan.cuts[0]:>3} of {n}   TTFT {plan.ttft_ms:9.2f} ms   {plan.tpot_ms:8.3f} ms/token   "
        f"edge {plan.edge_energy_j:8.4f} J" + (f"   ({'; '.join(notes)})" if notes else "")
    )
    stages = [
        f"    {s.device:<5} {s.profile.name:<20} layers [{s.start}, {s.end}){' + head' if s.end == n else '':<7}  "
        f"memory {m / 1e6:9.1f} MB"
        for s, m in zip(plan.stages, plan.memory_bytes, strict=True)
    ]
    return [head, *stages]


def report(
    title: Sequence[str], chosen: Plan | None, edge_only: Plan, cloud_only: Plan, n: int, budgets: Mapping[str, float]
) -> str:
    """The text `tandem partition` prints: `title` lines, then the chosen plan, edge-only and cloud-only."""
    lines = [*title, ""]
    for label, plan in (("chosen", chosen), ("edge-only", edge_only), ("cloud-only", cloud_only)):
        lines += _plan_lines(label, plan, n, budgets)
    return "\n".join(lines)


def _front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats on both coordinates (lower is better), sorted by the first."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not out or y < out[-1][1]:
            out.append((x, y))
    return out


def plot_front(cuts: Sequence[Cut], chosen: Plan | None, path: Path, title: str, budgets: Mapping[str, float]) -> None:
    """Two panels, every cut k coloured by k: TTFT vs edge energy, time per token vs edge energy. The
    front of the cuts that fit in memory is a line; cuts that do not fit are hollow; the chosen plan is
    a red star, budgets dashed. Raises ImportError without matplotlib (a dev dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cuts) - 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True, constrained_layout=True)
    for ax, attr, label in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "time per token (ms)")):
        xs = [getattr(c.plan, attr) for c in cuts]
        ys = [c.plan.edge_energy_j for c in cuts]
        dots = ax.scatter(xs, ys, c=[c.k for c in cuts], cmap="viridis", vmin=0, vmax=n, s=28, zorder=3)
        dots.set_facecolors([dots.to_rgba(c.k) if c.fits else "none" for c in cuts])
        dots.set_edgecolors([dots.to_rgba(c.k) for c in cuts])
        front = _front([(x, y) for x, y, c in zip(xs, ys, cuts, strict=True) if c.fits])
        ax.plot(*zip(*front, strict=True), color="0.4", lw=1, zorder=2, label="front")
        for c, text in ((cuts[0], "cloud-only"), (cuts[-1], "edge-only")):
            ax.annotate(f"{text} (k={c.k})", (getattr(c.plan, attr), c.plan.edge_energy_j), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        if chosen is not None:
            ax.scatter([getattr(chosen, attr)], [chosen.edge_energy_j], marker="*", s=220, color="red", zorder=4,
                       label=f"chosen (k={chosen.cuts[0]})")  # fmt: skip
        if budgets.get(attr):
            ax.axvline(budgets[attr], ls="--", color="red", lw=0.8)
        if budgets.get("energy_j"):
            ax.axhline(budgets["energy_j"], ls="--", color="red", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("edge energy (J)")
    fig.colorbar(dots, ax=axes, label="cut k (edge runs layers [0, k))")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the command -------------------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> str:
    """Why the numeric arguments are wrong ('' when they are fine)."""
    for flag in ("ttft_ms", "tpot_ms", "energy_j"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            return f"--{flag.replace('_', '-')} must be a finite number > 0, got {value:g}"
    for flag in ("prompt_tokens", "max_tokens"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}"
    return ""


def resolve_profile(text: str, kind: str) -> DeviceProfile:
    """The profile `text` names: a file, a shipped name, or a whole dash-separated part of exactly one
    shipped profile's name of `kind` ("a100" -> cloud-a100-80gb, "orin-nano" -> jetson-orin-nano).
    Raises ProfileError naming the candidates when the part is ambiguous, and load_profile's error when
    nothing matches."""
    try:
        return load_profile(text)
    except ProfileError:
        part = f"-{text.strip().lower()}-"
        named = [n for n in list_profiles() if part in f"-{n}-"]
        matches = [n for n in named if load_profile(n).kind == kind]
        if len(matches) == 1:
            return load_profile(matches[0])
        if len(matches) > 1:
            raise ProfileError(f"{text!r} names several {kind} profiles: {', '.join(matches)}") from None
        if named:
            raise ProfileError(f"{text!r} names no {kind} profile, only {', '.join(named)} (another kind)") from None
        raise


def _devices(args: argparse.Namespace) -> tuple[DeviceProfile, DeviceProfile, LinkSpec, str]:
    """The edge and cloud profiles, the link between them and its description. Raises ProfileError."""
    edge, cloud = resolve_profile(args.edge, "edge"), resolve_profile(args.cloud, "cloud")
    for flag, p, kind in (("--edge", edge, "edge"), ("--cloud", cloud, "cloud")):
        if p.kind != kind:
            raise ProfileError(f"{flag} {p.name} has kind {p.kind}; {flag} needs a profile of kind {kind}")
    if args.link is None:
        return edge, cloud, edge.link, f"{edge.name}'s own link"
    link = load_link(args.link)
    return edge, cloud, link.spec, link.name


def cmd_partition(args: argparse.Namespace) -> int:
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        edge, cloud, link, link_name = _devices(args)
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    card = model_card(args.model)  # the models' errors: main prints them and exits 2
    cost = card.cost()
    budgets = {"ttft_ms": args.ttft_ms or 0.0, "tpot_ms": args.tpot_ms or 0.0, "energy_j": args.energy_j or 0.0}
    cuts = every_cut(edge, cloud, link, cost, args.prompt_tokens, args.max_tokens, args.wire)
    error: PlanError | None = None
    try:
        chosen = single_cut(edge, cloud, cost, args.prompt_tokens, args.max_tokens, objective=args.objective,
                            link=link, wire=args.wire, **budgets)  # fmt: skip
    except PlanError as exc:
        chosen, error = None, exc
    n = cost.n_layers
    if args.plot:
        try:
            plot_front(
                cuts, chosen, Path(args.plot), f"{args.model}: {edge.name} - {link_name} - {cloud.name}", budgets
            )
        except (ImportError, OSError) as exc:
            print(f"error: --plot: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(_json_doc(args, card, edge, cloud, link_name, budgets, chosen, cuts, error)))
    else:
        print(report(_title(args, card, edge, cloud, link, link_name), chosen, cuts[n].plan, cuts[0].plan, n, budgets))
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _json_doc(
    args: argparse.Namespace, card: ModelCard, edge: DeviceProfile, cloud: DeviceProfile, link_name: str,
    budgets: Mapping[str, float], chosen: Plan | None, cuts: Sequence[Cut], error: PlanError | None,
) -> dict:  # fmt: skip
    """What `--json` prints: the inputs, the chosen plan (None when no cut fits), both ends, and the error."""
    n = card.config.n_layers
    return {
        "model": str(args.model), "n_layers": n, "weight_bytes": card.weight_bytes, "edge": edge.name,
        "cloud": cloud.name, "link": link_name, "objective": args.objective, "budgets": dict(budgets),
        "chosen": None if chosen is None else plan_json(chosen, n, budgets),
        "edge_only": plan_json(cuts[n].plan, n, budgets), "cloud_only": plan_json(cuts[0].plan, n, budgets),
        "error": None if error is None else {"binding": error.binding, "message": str(error)},
    }  # fmt: skip


def _title(
    args: argparse.Namespace, card: ModelCard, edge: DeviceProfile, cloud: DeviceProfile, link: LinkSpec, name: str
) -> list[str]:
    cost = card.cost()
    limits = ", ".join(f"{b} <= {getattr(args, b):g}" for b in BUDGETS if getattr(args, b)) or "no budgets"
    return [
        f"model {args.model}: {cost.n_layers} layers, {card.weight_bytes / 1e6:.1f} MB of weights as served "
        f"({cost.bits_per_weight:.2f} bits/weight), {args.wire} hidden states on the wire",
        f"edge {edge.name} -- link {name} ({link.rtt_ms:g} ms RTT, {link.uplink_mbps:g} Mbps up, "
        f"{link.downlink_mbps:g} down) -- cloud {cloud.name}",
        f"{args.prompt_tokens} prompt tokens, {args.max_tokens} new; minimise {args.objective} within {limits}",
    ]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "partition",
        help="where to cut a model's layers between an edge device and the cloud (the cost model's predictions)",
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="zoo name or .gguf path (header read only)")
    p.add_argument(
        "--edge",
        required=True,
        help="edge device profile: YAML file, shipped name, or a unique part of one (orin-nano)",
    )
    p.add_argument(
        "--cloud", required=True, help="cloud device profile: YAML file, shipped name, or a unique part of one (a100)"
    )
    p.add_argument("--link", help="link profile between them: shipped name or YAML file (default: the edge's own)")
    p.add_argument("--ttft-ms", type=float, help="budget: time to first token, ms")
    p.add_argument("--tpot-ms", type=float, help="budget: time per output token, ms")
    p.add_argument("--energy-j", type=float, help="budget: the edge device's energy for the request, J")
    p.add_argument("--objective", choices=list(BUDGETS), default="ttft_ms", help="what to minimise (default ttft_ms)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (default 256)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated (default 128)")
    p.add_argument("--wire", choices=["fp16", "int8"], default="fp16", help="hidden-state format on the link")
    p.add_argument("--plot", help="write a PNG of every cut's TTFT, time per token and edge energy")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_partition)
