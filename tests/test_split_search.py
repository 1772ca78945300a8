"""The joint search (partitioner/search.py): its costing against split.evaluate, and its front against brute force.

The acceptance check of issue 16: on a small grid (SmolLM2's 30 layers, three precisions per side, up to four
edge layers pruned), every point of the exhaustive Pareto front is dominated or matched, within 5% on every
objective, by a point optuna's NSGA-II returns.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from device_profiles import DeviceProfile, LinkSpec, load_profile
from partitioner.cost import ModelCost
from partitioner.search import (
    PRECISION_BITS,
    Budgets,
    Candidate,
    Figures,
    Grid,
    Point,
    Quality,
    canonical,
    exhaustive,
    figures,
    measured,
    pareto,
    search,
)
from partitioner.split import PlanError, evaluate
from tests.test_cost import SMOLLM2

PROMPT, NEW = 128, 64
CLOUD = load_profile("cloud-h100")
LAN = LinkSpec(rtt_ms=1, uplink_mbps=1000, downlink_mbps=1000)
GRID = Grid.full(SMOLLM2.n_layers, max_pruned=4)
# Synthetic BPB of whole-model variants: quantization and pruning cost quality; int4 with four layers pruned
# was "not measured", so those points must stay out of a search given this table.
BPB = {(p, k): 1.0 + {"fp32": 0.0, "int8": 0.005, "int4": 0.05}[p] + 0.03 * k for p in PRECISION_BITS for k in range(5)}
del BPB["int4", 4]
TOL = 0.05
N_TRIALS = 600  # of the 1245 grid points, it evaluates about 300 distinct ones


def covered(point: Candidate, front: list[Candidate], tol: float = TOL) -> bool:
    """Whether some point of `front` is no worse than `point` by more than `tol` on every objective."""
    return any(
        all(r <= x * (1 + tol) + 1e-12 for r, x in zip(f.objectives, point.objectives, strict=True)) for f in front
    )


def fig(point: Point, edge: DeviceProfile, link: LinkSpec | None = None, quality: Quality | None = None) -> Figures:
    return figures(point, edge, CLOUD, SMOLLM2, PROMPT, NEW, link=link, quality=quality)


# -- costing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", list(PRECISION_BITS))
@pytest.mark.parametrize(("cut", "pruned"), [(0, 0), (1, 0), (15, 0), (29, 0), (30, 0), (10, 3), (30, 4), (4, 4)])
def test_uniform_precision_is_split_evaluate(precision: str, cut: int, pruned: int) -> None:
    """One precision on both sides: the plan split.evaluate predicts for the pruned model (N - pruned layers)
    cut at k - pruned, every figure and both sides' memory."""
    edge = load_profile("jetson-orin-nano")
    f = fig(Point(cut, precision, precision, pruned), edge, LAN)
    cfg = dataclasses.replace(SMOLLM2, n_layers=SMOLLM2.n_layers - pruned)
    cost = ModelCost.from_config(cfg, bits_per_weight=PRECISION_BITS[precision])
    plan = evaluate((("edge", edge), ("cloud", CLOUD)), (LAN,), cost, PROMPT, NEW, (cut - pruned,))
    for got, want in ((f.ttft_ms, plan.ttft_ms), (f.tpot_ms, plan.tpot_ms), (f.energy_j, plan.edge_energy_j)):
        assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12)
    held = {s.device: m for s, m in zip(plan.stages, plan.memory_bytes, strict=True)}
    assert math.isclose(f.edge_bytes, held.get("edge", 0.0)) and math.isclose(f.cloud_bytes, held.get("cloud", 0.0))


@pytest.mark.parametrize("cut", [1, 12, 29])
def test_each_side_costed_at_its_own_precision(cut: int) -> None:
    """The figures add up per side: swapping the two sides' precisions between two mixed plans gives the two
    uniform ones; the edge's energy and memory follow its precision only, the cloud's memory its own."""
    edge = load_profile("raspberry-pi-5")
    for a, b in (("fp32", "int4"), ("int8", "fp32"), ("int4", "int8")):
        ab, ba = fig(Point(cut, a, b), edge), fig(Point(cut, b, a), edge)
        aa, bb = fig(Point(cut, a, a), edge), fig(Point(cut, b, b), edge)
        for name in ("ttft_ms", "tpot_ms"):
            mixed = getattr(ab, name) + getattr(ba, name)
            assert math.isclose(mixed, getattr(aa, name) + getattr(bb, name), rel_tol=1e-12)
        assert ab.energy_j == aa.energy_j and ab.edge_bytes == aa.edge_bytes and ab.cloud_bytes == bb.cloud_bytes


def test_a_side_without_layers_takes_the_other_sides_precision() -> None:
    edge = load_profile("jetson-orin-nano")
    assert canonical(Point(30, "int4", "fp32"), 30) == Point(30, "int4", "int4")
    assert canonical(Point(3, "int4", "int8", pruned=3), 30) == Point(3, "int8", "int8", pruned=3)
    assert canonical(Point(3, "int4", "int8", pruned=2), 30) == Point(3, "int4", "int8", pruned=2)
    assert fig(Point(30, "int4", "fp32"), edge) == fig(Point(30, "int4", "int4"), edge)
    points = GRID.points(30)
    assert len(points) == len(set(points)) and all(canonical(p, 30) == p for p in points)
    assert Point(0, "fp32", "int4") not in points  # the edge holds nothing: the same as (0, int4, int4)


def test_quality_is_known_for_measured_uniform_variants_only() -> None:
    quality, edge = measured(BPB), load_profile("jetson-orin-nano")
    assert fig(Point(30, "int8", "fp32", 2), edge, quality=quality).bpb == BPB["int8", 2]  # edge-only: int8
    assert fig(Point(12, "int8", "fp32"), edge, quality=quality).bpb is None  # mixed: not measured
    assert fig(Point(30, "int4", "int4", 4), edge, quality=quality).bpb is None  # not in the table
    assert fig(Point(12, "int8", "int8"), edge).bpb is None  # no quality given


@pytest.mark.parametrize(
    "bad",
    [lambda: Point(3, "fp16", "fp32"), lambda: Point(2, "fp32", "fp32", pruned=3), lambda: Grid((), ("fp32",))],
)
def test_bad_points_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]


def test_bad_requests_are_refused() -> None:
    edge = load_profile("jetson-orin-nano")
    with pytest.raises(ValueError, match="bpb budget needs a quality"):
        exhaustive(edge, CLOUD, SMOLLM2, PROMPT, NEW, budgets=Budgets(bpb=1.2))
    with pytest.raises(ValueError, match="cut must be in"):
        exhaustive(edge, CLOUD, SMOLLM2, PROMPT, NEW, grid=Grid((31,)))
    with pytest.raises(ValueError, match="ttft_ms"):
        Budgets(ttft_ms=-1)


# -- fronts ------------------------------------------------------------------------------------------------------


def _c(*objectives: float) -> Candidate:
    f = Figures(*objectives[:3], bpb=objectives[3] if len(objectives) > 3 else None, edge_bytes=0.0,
                cloud_bytes=0.0, memory_ratio=0.0)  # fmt: skip
    return Candidate(Point(0, "fp32", "fp32"), f)


def test_pareto_keeps_the_non_dominated_once() -> None:
    a, b, c, d, a2 = _c(1, 5, 0), _c(2, 1, 3), _c(2, 5, 3), _c(1, 5, 1), _c(1, 5, 0)
    assert pareto([c, a, b, d, a2]) == [a, b]  # c and d dominated by a; a2 equals a and comes later
    assert pareto([]) == []
    with pytest.raises(ValueError, match="mix"):
        pareto([_c(1, 1, 1), _c(1, 1, 1, 1.2)])


def _brute_front(candidates: list[Candidate]) -> set[tuple[float, ...]]:
    objs = [c.objectives for c in candidates]
    return {
        o
        for o in objs
        if not any(all(x <= y for x, y in zip(p, o, strict=True)) and p != o for p in objs)  # nobody dominates o
    }


def test_exhaustive_front_is_the_brute_force_front() -> None:
    """exhaustive's front: the vectors no grid point dominates, each once."""
    edge, quality = load_profile("jetson-orin-nano"), measured(BPB)
    every = [Candidate(p, fig(p, edge, quality=quality)) for p in GRID.points(30)]
    known = [c for c in every if c.figures.bpb is not None]
    front = exhaustive(edge, CLOUD, SMOLLM2, PROMPT, NEW, grid=GRID, quality=quality)
    assert {c.objectives for c in front} == _brute_front(known)
    assert len(front) == len(_brute_front(known))


@pytest.mark.parametrize("with_quality", [False, True], ids=["3-objectives", "with-bpb"])
@pytest.mark.parametrize("link", [None, LAN], ids=["own-link", "lan"])
@pytest.mark.parametrize("edge_name", ["jetson-orin-nano", "raspberry-pi-5"])
def test_search_front_covers_exhaustive(edge_name: str, link: LinkSpec | None, with_quality: bool) -> None:
    """Issue 16's acceptance: every exhaustive Pareto point dominated or matched, within 5%, by a returned one;
    every returned point a feasible grid point (with a known BPB when a quality is given)."""
    edge, quality = load_profile(edge_name), measured(BPB) if with_quality else None
    budgets = Budgets(tpot_ms=25.0)  # rules out the fp32 Raspberry Pi's whole-model decode
    kw = {"budgets": budgets, "grid": GRID, "quality": quality, "link": link}
    truth = exhaustive(edge, CLOUD, SMOLLM2, PROMPT, NEW, **kw)
    found = search(edge, CLOUD, SMOLLM2, PROMPT, NEW, n_trials=N_TRIALS, seed=0, **kw)
    missed = [c for c in truth if not covered(c, found)]
    assert not missed, f"{len(missed)} of {len(truth)} exhaustive Pareto points not covered: {missed[:3]}"
    grid = set(GRID.points(30))
    for c in found:
        assert c.point in grid and c.figures.tpot_ms <= 25.0 and c.figures.memory_ratio <= 1
        assert (c.figures.bpb is not None) == with_quality
    assert found == pareto(found)


def test_search_is_deterministic_for_a_seed() -> None:
    edge = load_profile("jetson-orin-nano")
    run = lambda seed: search(edge, CLOUD, SMOLLM2, PROMPT, NEW, grid=GRID, quality=measured(BPB),  # noqa: E731
                              n_trials=200, seed=seed)  # fmt: skip
    assert run(3) == run(3)


# -- refusals ----------------------------------------------------------------------------------------------


def _both(
    edge: DeviceProfile, budgets: Budgets, quality: Quality | None = None, cloud: DeviceProfile = CLOUD
) -> list[PlanError]:
    """The PlanError of exhaustive and of search, for the same request."""
    errors = []
    for solve in (exhaustive, lambda *a, **k: search(*a, n_trials=100, **k)):
        with pytest.raises(PlanError) as info:
            solve(edge, cloud, SMOLLM2, PROMPT, NEW, budgets=budgets, grid=GRID, quality=quality)
        errors.append(info.value)
    return errors


def test_a_budget_nobody_meets_names_it() -> None:
    edge = load_profile("jetson-orin-nano")
    every = [fig(p, edge) for p in GRID.points(30)]
    best_ttft, best_tpot = min(f.ttft_ms for f in every), min(f.tpot_ms for f in every)
    for budgets, binding in (
        (Budgets(ttft_ms=best_ttft / 2), "ttft_ms"),
        (Budgets(tpot_ms=best_tpot / 2), "tpot_ms"),
        (Budgets(ttft_ms=best_ttft / 3, tpot_ms=best_tpot * 0.9), "ttft_ms"),  # the worse violation binds
        (Budgets(ttft_ms=10.0, energy_j=1.5), "energy_j"),  # only the edge is that quick; at 1.9 J, least over
    ):
        for error in _both(edge, budgets):
            assert error.binding == binding and f"binding constraint {binding}" in str(error)
    for error in _both(edge, Budgets(bpb=0.9), measured(BPB)):
        assert error.binding == "bpb"


def test_nothing_fits_in_memory() -> None:
    edge = dataclasses.replace(load_profile("jetson-orin-nano"), memory_gb=0.01)
    for error in _both(edge, Budgets(ttft_ms=1e6), cloud=dataclasses.replace(CLOUD, memory_gb=0.01)):
        assert error.binding == "memory" and "fits in memory" in str(error)
