"""The joint search (issue 16): cut, precision per side and edge-side pruning, as a Pareto front.

A `Point` of the joint space is a single edge-to-cloud cut k (as `partitioner.split.single_cut`), the
precision each side stores its weights at, and how many of the edge's layers are pruned:

- the edge's layers are [0, k) of the full model; `pruned` of them are removed, so the edge runs
  k - pruned blocks, the cloud runs [k, N), and the model runs N - pruned. For cost that is the model
  of N - pruned layers cut at k - pruned (a pruned layer costs nothing anywhere), which is how
  `figures` costs it. Which sliding layers remain follows the config's pattern over N - pruned layers;
- precision is one of PRECISION_BITS per side. Each side's blocks (and the head, on the side that
  runs it) are costed with a ModelCost built at that side's bits per weight (and its KV cache bits),
  through split.py's per-layer helpers: a device's time is its layers' share of the whole model's
  roofline at its own precision, so a uniform precision gives exactly `split.evaluate`'s figures
  (tests/test_split_search.py checks it). The request model (what crosses the link and when) is
  split.py's, for the chain [edge, cloud];
- quality is the bits per byte (BPB) of the variant, where it has been measured: a `Quality` maps a
  point to its BPB or None. `measured` builds one from a table of whole-model variants (precision,
  pruned) -> BPB: a point is known when both sides that hold layers share the precision. When a
  quality is given, only points with a known BPB are in the search (an unknown point is infeasible,
  constraint "measured"), and BPB is a fourth objective; without one, the front has three.

A side that holds no layers has no precision that matters: `canonical` gives it the other side's, so
points that cost the same are the same point. Budgets (0: no limit) and memory are constraints, not
penalties: optuna's NSGA-II ranks feasible trials by the objectives and infeasible ones by how far
they miss. Each trial sets them with `Trial.set_constraint`: optuna 5.0 deprecates the sampler's
`constraints_func` (removal in 7.0) for it, with the same constrained domination. A point already
visited is pruned rather than scored again: repeats would crowd the population on this discrete grid.
Units: milliseconds, joules, bytes, bits per byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

from device_profiles import DeviceProfile, LinkSpec
from models.config import ModelConfig
from partitioner.cost import BYTES_PER_PROMPT_TOKEN, MEMORY_HEADROOM, ModelCost
from partitioner.split import (
    TOKEN_ID_BYTES,
    PlanError,
    Wire,
    head_decode_ms,
    head_prefill_ms,
    hidden_bytes,
    layer_decode_ms,
    layer_prefill_ms,
    stage_memory_bytes,
    transfer_ms,
)

PRECISION_BITS: Mapping[str, float] = {"fp32": 32.0, "int8": 8.5, "int4": 5.0}
"""Stored bits per weight of each precision, scales included (as cost.served_model_cost counts a bundle)."""
MUTATION_PROB = 0.4
"""Chance NSGA-II resamples each coordinate of a child. Optuna's default, 1 / 4 coordinates, left one run in 80
short of the exhaustive front on tests/test_split_search.py's grid (600 trials, 50 per generation); 0.4
left none in 240 (seeds 0-29)."""
BUDGET_NAMES = ("ttft_ms", "tpot_ms", "energy_j", "bpb")
"""The budgets, in the order a tie between binding constraints is broken."""


@dataclass(frozen=True)
class Point:
    """One plan of the joint space."""

    cut: int
    """k: the edge holds the full model's layers [0, k), the cloud [k, N) and the head when k < N."""
    edge_precision: str
    """The edge's weights: a key of PRECISION_BITS."""
    cloud_precision: str
    """The cloud's weights: a key of PRECISION_BITS."""
    pruned: int = 0
    """Layers removed from the edge's [0, k); at most k."""

    def __post_init__(self) -> None:
        for side in (self.edge_precision, self.cloud_precision):
            if side not in PRECISION_BITS:
                raise ValueError(f"precision must be one of {list(PRECISION_BITS)}, got {side!r}")
        if not 0 <= self.pruned <= self.cut:
            raise ValueError(f"pruned must be in [0, cut={self.cut}] (edge layers only), got {self.pruned}")

    @property
    def edge_layers(self) -> int:
        """Blocks the edge runs: k - pruned."""
        return self.cut - self.pruned


def canonical(point: Point, n_layers: int) -> Point:
    """`point` with the precision of a side that holds no layers set to the other side's (it costs nothing
    and changes no output). Raises ValueError when the cut or the pruning does not fit `n_layers`."""
    if not 0 <= point.cut <= n_layers or point.pruned >= n_layers:
        raise ValueError(f"cut must be in [0, {n_layers}] and pruned < {n_layers}, got {point}")
    if point.edge_layers == 0:
        return replace(point, edge_precision=point.cloud_precision)
    if point.cut == n_layers:
        return replace(point, cloud_precision=point.edge_precision)
    return point


@dataclass(frozen=True)
class Grid:
    """The values each coordinate may take; `points` is the grid, `search` samples from it."""

    cuts: tuple[int, ...]
    """Cuts k in [0, N]."""
    precisions: tuple[str, ...] = tuple(PRECISION_BITS)
    """Precisions either side may take."""
    pruned: tuple[int, ...] = (0,)
    """Edge layers pruned; a point with pruned > k is pruned k (every edge layer)."""

    def __post_init__(self) -> None:
        if not (self.cuts and self.precisions and self.pruned):
            raise ValueError(f"every coordinate needs at least one value, got {self}")
        if min(self.cuts) < 0 or min(self.pruned) < 0:
            raise ValueError(f"cuts and pruned must be >= 0, got {self}")
        for p in self.precisions:
            Point(0, p, p)  # raises for an unknown precision

    @classmethod
    def full(cls, n_layers: int, precisions: Sequence[str] = tuple(PRECISION_BITS), max_pruned: int = 0) -> Grid:
        """Every cut of `n_layers`, `precisions` on each side, 0..max_pruned edge layers pruned."""
        return cls(tuple(range(n_layers + 1)), tuple(precisions), tuple(range(max_pruned + 1)))

    def point(self, cut: int, edge: str, cloud: str, pruned: int, n_layers: int) -> Point:
        """The canonical point these coordinates name (pruning clipped to the cut)."""
        return canonical(Point(cut, edge, cloud, min(pruned, cut)), n_layers)

    def points(self, n_layers: int) -> list[Point]:
        """The distinct canonical points, in grid order. Raises ValueError for a cut > n_layers or a
        pruning that leaves no layer."""
        seen: dict[Point, None] = {}
        for k in self.cuts:
            for e in self.precisions:
                for c in self.precisions:
                    for p in self.pruned:
                        seen.setdefault(self.point(k, e, c, p, n_layers))
        return list(seen)


Quality = Callable[[Point], float | None]
"""A point's measured BPB (lower is better), or None where it has not been measured."""


def measured(table: Mapping[tuple[str, int], float]) -> Quality:
    """The Quality of whole-model variants measured at (precision, pruned): a canonical point is known
    when its two precisions agree (a mixed-precision split has not been measured)."""

    def quality(point: Point) -> float | None:
        if point.edge_precision != point.cloud_precision:
            return None
        return table.get((point.edge_precision, point.pruned))

    return quality


@dataclass(frozen=True)
class Figures:
    """What a point is predicted to cost, and its quality."""

    ttft_ms: float
    """Time to first token: the edge's prefill, what crosses the link, the cloud's prefill and head."""
    tpot_ms: float
    """One decode step: both sides' layers, the hidden vector up and the token id down while split."""
    energy_j: float
    """Edge-kind devices' compute energy over the request."""
    bpb: float | None
    """Measured bits per byte of the variant; None where unknown."""
    edge_bytes: float
    """What the edge holds: its layers' weights and KV cache, the embedding and head where it runs them."""
    cloud_bytes: float
    """What the cloud holds, likewise."""
    memory_ratio: float
    """The fuller side's holding over what it may fill ((1 - MEMORY_HEADROOM) of its memory); <= 1 fits."""


@dataclass(frozen=True)
class Candidate:
    """A point with its figures: one entry of a front."""

    point: Point
    """Where layers run, at which precision, how many pruned."""
    figures: Figures
    """Its predicted cost and quality."""

    @property
    def objectives(self) -> tuple[float, ...]:
        """(TTFT, time per token, edge energy) and BPB where known, all to minimise."""
        f = self.figures
        return (f.ttft_ms, f.tpot_ms, f.energy_j) + (() if f.bpb is None else (f.bpb,))


@dataclass(frozen=True)
class Budgets:
    """Upper limits on the figures; 0 means no limit."""

    ttft_ms: float = 0.0
    """Time to first token, ms."""
    tpot_ms: float = 0.0
    """Time per output token, ms."""
    energy_j: float = 0.0
    """Edge energy over the request, J."""
    bpb: float = 0.0
    """Bits per byte (needs a Quality)."""

    def __post_init__(self) -> None:
        for name in BUDGET_NAMES:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0: no limit), got {value!r}")

    def limits(self) -> dict[str, float]:
        """The budgets that are set, by name, in BUDGET_NAMES order."""
        return {name: getattr(self, name) for name in BUDGET_NAMES if getattr(self, name)}


# -- costing one point -------------------------------------------------------------------------------------


def side_costs(cfg: ModelConfig, point: Point) -> tuple[ModelCost, ModelCost]:
    """(edge, cloud) ModelCosts of the pruned model (N - pruned layers), at each side's precision."""
    kept = replace(cfg, n_layers=cfg.n_layers - point.pruned) if point.pruned else cfg
    return (
        ModelCost.from_config(kept, bits_per_weight=PRECISION_BITS[point.edge_precision]),
        ModelCost.from_config(kept, bits_per_weight=PRECISION_BITS[point.cloud_precision]),
    )


def _compute_ms(
    profile: DeviceProfile, cost: ModelCost, layers: int, head: bool, prompt_tokens: int, context: float
) -> tuple[float, float]:
    """(prefill, one decode step at `context`) of `layers` blocks and, if `head`, the final norm and head."""
    prefill = layers * layer_prefill_ms(profile, cost, prompt_tokens)
    decode = layers * layer_decode_ms(profile, cost, context)
    if head:
        prefill += head_prefill_ms(profile, cost, prompt_tokens)
        decode += head_decode_ms(profile, cost, context)
    return prefill, decode


def _link_ms(link: LinkSpec, cost: ModelCost, k: int, prompt_tokens: int, wire: Wire) -> tuple[float, float]:
    """(before the first token, per decode step) on the link at cut k: the text up when the cloud holds
    everything, every prompt position's hidden state up (then one hidden vector up and the token id
    down each step) when split, nothing when the edge holds everything."""
    if k == cost.n_layers:
        return 0.0, 0.0
    if k == 0:
        return transfer_ms(link, prompt_tokens * BYTES_PER_PROMPT_TOKEN, "up"), 0.0
    hidden = hidden_bytes(cost, wire)
    step = transfer_ms(link, hidden, "up") + transfer_ms(link, TOKEN_ID_BYTES, "down")
    return transfer_ms(link, prompt_tokens * hidden, "up"), step


def figures(
    point: Point,
    edge: DeviceProfile,
    cloud: DeviceProfile,
    cfg: ModelConfig,
    prompt_tokens: int,
    max_new_tokens: int,
    *,
    link: LinkSpec | None = None,
    wire: Wire = "fp16",
    quality: Quality | None = None,
) -> Figures:
    """Predicted figures of `point` (split.py's request model; `link` defaults to the edge's link).
    Raises ValueError for bad inputs."""
    if prompt_tokens < 1 or max_new_tokens < 1:
        raise ValueError(f"prompt_tokens and max_new_tokens must be >= 1, got {prompt_tokens}, {max_new_tokens}")
    point = canonical(point, cfg.n_layers)
    e_cost, c_cost = side_costs(cfg, point)
    n, k = e_cost.n_layers, point.edge_layers
    mean = prompt_tokens + max_new_tokens / 2  # decode steps at the mean context, as split.py
    e_pre, e_dec = _compute_ms(edge, e_cost, k, k == n, prompt_tokens, mean)
    c_pre, c_dec = _compute_ms(cloud, c_cost, n - k, k < n, prompt_tokens, mean)
    up, step = _link_ms(link or edge.link, e_cost, k, prompt_tokens, wire)
    steps = max_new_tokens - 1
    energy = sum(
        p.power_active_w * (pre + steps * dec) / 1e3
        for p, pre, dec, held in ((edge, e_pre, e_dec, k > 0), (cloud, c_pre, c_dec, k < n))
        if held and p.kind == "edge"
    )
    context = prompt_tokens + max_new_tokens
    e_bytes = stage_memory_bytes(e_cost, 0, k, context) if k > 0 else 0.0
    c_bytes = stage_memory_bytes(c_cost, k, n, context) if k < n else 0.0
    cap = 1 - MEMORY_HEADROOM
    return Figures(
        ttft_ms=e_pre + up + c_pre,
        tpot_ms=e_dec + c_dec + step,
        energy_j=energy,
        bpb=quality(point) if quality is not None else None,
        edge_bytes=e_bytes,
        cloud_bytes=c_bytes,
        memory_ratio=max(e_bytes / (cap * edge.memory_gb * 1e9), c_bytes / (cap * cloud.memory_gb * 1e9)),
    )


# -- fronts and refusals -------------------------------------------------------------------------------------


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether objective vector `a` is no worse than `b` everywhere and better somewhere (minimising)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The non-dominated candidates, sorted by objectives; of equal objective vectors the first is kept.
    A dominated candidate sorts after a candidate that dominates it, so each is checked against the
    front kept so far only. Raises ValueError when the objective vectors differ in length."""
    if len({len(c.objectives) for c in candidates}) > 1:
        raise ValueError("candidates mix three and four objectives: BPB must be known for all or none")
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: c.objectives):
        if not any(f.objectives == c.objectives or dominates(f.objectives, c.objectives) for f in front):
            front.append(c)
    return front


def _value(f: Figures, name: str) -> float:
    """Figure `name` of `f`; an unknown BPB counts as infinitely bad."""
    value = getattr(f, name)
    return math.inf if value is None else value


def constraints(f: Figures, budgets: Budgets, with_quality: bool) -> dict[str, float]:
    """Named constraint values, feasible when <= 0: "memory" (the fuller side's share of its memory
    over 1), each set budget (value / limit - 1), and with a quality "measured" (1 where BPB is unknown)."""
    out = {"memory": f.memory_ratio - 1.0}
    for name, limit in budgets.limits().items():
        value = getattr(f, name)
        out[name] = 1.0 if value is None else value / limit - 1.0  # unknown BPB: as "measured" counts it
    if with_quality:
        out["measured"] = 0.0 if f.bpb is not None else 1.0
    return out


def refuse(candidates: Sequence[Candidate], budgets: Budgets, where: str) -> NoReturn:
    """Raise PlanError for `candidates` (none feasible), single_cut's rule: binding "memory" when none fits
    in memory, else the worst-violated budget of the candidate whose worst value/limit ratio is least."""
    fitting = [c for c in candidates if c.figures.memory_ratio <= 1.0]
    if not fitting:
        raise PlanError(f"no plan {where} fits in memory ({MEMORY_HEADROOM:.0%} of each side kept free)", "memory")
    limits = budgets.limits()
    ratios = [{b: _value(c.figures, b) / v for b, v in limits.items()} for c in fitting]
    worst = [max(r.values()) for r in ratios]
    at = worst.index(min(worst))
    binding = max(ratios[at], key=ratios[at].__getitem__)
    closest = fitting[at]
    raise PlanError(
        f"no plan {where} meets the budget: binding constraint {binding} — the closest ({closest.point}) "
        f"predicts {binding} = {_value(closest.figures, binding):.4g} against a budget of {limits[binding]:.4g}",
        binding=binding,
    )


# -- the solvers -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """One request's inputs, shared by `search` and `exhaustive`."""

    edge: DeviceProfile
    cloud: DeviceProfile
    cfg: ModelConfig
    prompt_tokens: int
    max_new_tokens: int
    budgets: Budgets
    grid: Grid
    quality: Quality | None
    link: LinkSpec | None
    wire: Wire

    def score(self, point: Point) -> Candidate:
        """`point` with its figures."""
        f = figures(
            point,
            self.edge,
            self.cloud,
            self.cfg,
            self.prompt_tokens,
            self.max_new_tokens,
            link=self.link,
            wire=self.wire,
            quality=self.quality,
        )
        return Candidate(point, f)

    def feasible(self, c: Candidate) -> bool:
        """Whether `c` fits in memory, meets every budget and (with a quality) has a known BPB."""
        return all(v <= 0 for v in constraints(c.figures, self.budgets, self.quality is not None).values())

    def grid_candidates(self) -> list[Candidate]:
        """Every point of the grid, scored; with a quality, only those whose BPB is known."""
        scored = [self.score(p) for p in self.grid.points(self.cfg.n_layers)]
        if self.quality is None:
            return scored
        known = [c for c in scored if c.figures.bpb is not None]
        if not known:
            raise ValueError("no point of the grid has a measured BPB: give the quality table's variants")
        return known


def _problem(
    edge: DeviceProfile,
    cloud: DeviceProfile,
    cfg: ModelConfig,
    prompt_tokens: int,
    max_new_tokens: int,
    budgets: Budgets,
    grid: Grid | None,
    quality: Quality | None,
    link: LinkSpec | None,
    wire: Wire,
) -> _Problem:
    if budgets.bpb and quality is None:
        raise ValueError("a bpb budget needs a quality (measured BPB) to judge it")
    grid = grid or Grid.full(cfg.n_layers)
    grid.points(cfg.n_layers)  # raises for cuts or pruning the model cannot take
    hidden_bytes(ModelCost.from_config(cfg), wire)  # raises for an unknown wire format
    return _Problem(edge, cloud, cfg, prompt_tokens, max_new_tokens, budgets, grid, quality, link, wire)


def exhaustive(
    edge: DeviceProfile,
    cloud: DeviceProfile,
    cfg: ModelConfig,
    prompt_tokens: int,
    max_new_tokens: int,
    *,
    budgets: Budgets = Budgets(),
    grid: Grid | None = None,
    quality: Quality | None = None,
    link: LinkSpec | None = None,
    wire: Wire = "fp16",
) -> list[Candidate]:
    """The Pareto front of every feasible point of `grid` (default: every cut, all precisions, no
    pruning), by brute force: the reference `search` is checked against.

    Raises ValueError for bad inputs, PlanError (binding "memory" or a budget's name) when no point fits.
    """
    prob = _problem(edge, cloud, cfg, prompt_tokens, max_new_tokens, budgets, grid, quality, link, wire)
    scored = prob.grid_candidates()
    feasible = [c for c in scored if prob.feasible(c)]
    if not feasible:
        refuse(scored, budgets, "of the grid")
    return pareto(feasible)


def search(
    edge: DeviceProfile,
    cloud: DeviceProfile,
    cfg: ModelConfig,
    prompt_tokens: int,
    max_new_tokens: int,
    *,
    budgets: Budgets = Budgets(),
    grid: Grid | None = None,
    quality: Quality | None = None,
    link: LinkSpec | None = None,
    wire: Wire = "fp16",
    n_trials: int = 600,
    population_size: int = 50,
    seed: int = 0,
) -> list[Candidate]:
    """The Pareto front of the feasible points optuna's NSGA-II visits in `n_trials` trials over `grid`
    (one categorical per coordinate), deduplicated by canonical point; deterministic for a `seed`.
    Objectives: TTFT, time per token, edge energy, and BPB when a quality is given. Memory, the budgets
    and (with a quality) a known BPB are constraints, set per trial with `Trial.set_constraint`.

    Raises ValueError for bad inputs, PlanError when no trial is feasible: binding "memory" or a budget's
    name, from the whole grid when nothing there fits, else from the trials (more trials may find one).
    """
    import optuna  # about 0.36 s to import (this machine), three times partitioner.search: this solver only

    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    prob = _problem(edge, cloud, cfg, prompt_tokens, max_new_tokens, budgets, grid, quality, link, wire)
    seen: dict[Point, Candidate] = {}
    size = len(prob.grid.points(cfg.n_layers))
    with_quality = quality is not None

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        g, n = prob.grid, cfg.n_layers
        point = g.point(
            trial.suggest_categorical("cut", g.cuts),
            trial.suggest_categorical("edge_precision", g.precisions),
            trial.suggest_categorical("cloud_precision", g.precisions),
            trial.suggest_categorical("pruned", g.pruned),
            n,
        )
        if point in seen:  # known figures; a repeat in the population would crowd out the others
            raise optuna.TrialPruned(f"{point} already visited")
        c = seen[point] = prob.score(point)
        if len(seen) == size:  # the whole grid visited: the front is exhaustive's
            trial.study.stop()
        for name, value in constraints(c.figures, budgets, with_quality).items():
            trial.set_constraint(name, value)
        values = c.objectives
        return values if len(values) == 3 + with_quality else (*values, math.inf)  # unknown BPB: worst

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(population_size=population_size, mutation_prob=MUTATION_PROB, seed=seed)
    study = optuna.create_study(directions=["minimize"] * (3 + with_quality), sampler=sampler)
    study.optimize(objective, n_trials=n_trials)
    feasible = [c for c in seen.values() if prob.feasible(c)]
    if feasible:
        return pareto(feasible)
    everything = prob.grid_candidates()
    if not any(prob.feasible(c) for c in everything):
        refuse(everything, budgets, "of the grid")
    visited = [c for c in seen.values() if not with_quality or c.figures.bpb is not None]
    if not visited:
        raise PlanError(f"none of {n_trials} trials met a point with a measured BPB: raise n_trials", "measured")
    refuse(visited, budgets, f"among {n_trials} trials (the grid has one that does: raise n_trials)")
