"""MoE² in the hub (cloud_hub.moe2_router): the router over a fake fleet against the pure selector's
brute force, its cache, its refusals; then a real hub with router_policy "moe2" and two tiny agents."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import httpx
import numpy as np
import pytest

from cloud_hub.candidates import Candidate
from cloud_hub.errors import BudgetUnsatisfiable
from cloud_hub.estimates import weigh
from cloud_hub.moe2_router import Moe2Router, expert_id
from cloud_hub.prompt import prompt_from_value
from cloud_hub.router import Budget, BudgetRouter
from cloud_hub.server import HubConfig, make_router
from device_profiles import load_profile
from models.runtime import load
from models.serving import ServedModel
from partitioner.cost import ModelCost
from partitioner.moe2.experts import Budget as MoeBudget
from partitioner.moe2.experts import Expert, Problem, SelectionError
from partitioner.moe2.objective import GatedObjective
from partitioner.moe2.select import brute_force
from partitioner.moe2.table import ExpertTable, TableError
from tandem import AsyncClient
from tests.hubkit import running_hub, start_served_agent, wait_for
from tests.test_cost import SMOLLM2
from tests.tiny import TinySpec, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

COST = ModelCost.from_config(SMOLLM2, bits_per_weight=32.0)
SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
TOKENS, MAX_TOKENS = 64, 32


def cand(kind: str, profile: str, device: str, model: str, quant: str, queued: int = 0) -> Candidate:
    return Candidate(kind, device, load_profile(profile), model, COST, queued, quant=quant)


def fleet(queued: tuple[int, ...] = (0, 0, 0, 0, 0)) -> list[Candidate]:
    """Three edge experts, the cloud, and a device serving a model the gate does not know."""
    q = queued
    return [
        cand("edge", "raspberry-pi-5", "pi", SMOL, "int4", q[0]),
        cand("edge", "cpu-2core", "cpu", SMOL, "fp32", q[1]),
        cand("edge", "jetson-orin-nano", "nano", GEMMA, "int8", q[2]),
        cand("cloud", "cloud-h100", "", GEMMA, "source", q[3]),
        cand("edge", "x86-laptop-cpu", "laptop", "unknown-model", "fp32", q[4]),
    ]


VARIANTS = (f"{SMOL}/int8", f"{SMOL}/int4", f"{SMOL}/fp32", f"{GEMMA}/int8", f"{GEMMA}/source")
"""The table's columns: one variant no device serves, the others in another order than the fleet's."""
FAMILIES = tuple(v.split("/")[0] for v in VARIANTS)


def random_table(seed: int, requests: int = 24) -> ExpertTable:
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(len(VARIANTS)), size=requests)
    losses = rng.uniform(0.8, 2.0, size=(requests, len(VARIANTS)))
    return ExpertTable(VARIANTS, FAMILIES, weights, losses, rng.uniform(50, 200, size=requests))


def expected(table: ExpertTable, candidates: list[Candidate], budget: Budget) -> tuple[Candidate, list[str]] | None:
    """The pure selector's answer by brute force over the same experts: (the top expert's candidate,
    the selected ids), None when no subset fits."""
    mapped = [c for c in candidates if f"{c.model}/{c.quant}" in table.variants]
    cols = [table.variants.index(f"{c.model}/{c.quant}") for c in mapped]
    figures = [weigh(c, TOKENS, MAX_TOKENS, 0, 0.95)[1] for c in mapped]
    experts = tuple(
        Expert(
            expert_id(c),
            c.device_id or "cloud",
            c.model,
            c.quant,
            table.tokenizers[col],
            c.kind,
            a.ttft_ms,
            a.edge_energy_j,
            float(table.losses[:, col].mean()),
        )
        for c, col, a in zip(mapped, cols, figures, strict=True)
    )
    w = table.weights[:, cols]
    objective = GatedObjective(w / w.sum(axis=1, keepdims=True), table.losses[:, cols],
                               tuple(table.tokenizers[c] for c in cols), table.n_bytes)  # fmt: skip
    try:
        chosen = brute_force(Problem(experts, objective), MoeBudget(budget.energy_j or None, budget.ttft_ms or None))
    except SelectionError:
        return None
    prior = table.weights.mean(axis=0)[cols]
    members = [i for i, e in enumerate(experts) if e.id in chosen.subset]
    top = min(members, key=lambda i: (-prior[i], i))
    return mapped[top], list(chosen.subset)


def grid(candidates: list[Candidate]) -> list[Budget]:
    """Budgets at every expert's own energy and TTFT (and unconstrained), each pair of them."""
    figures = [weigh(c, TOKENS, MAX_TOKENS, 0, 0.95)[1] for c in candidates]
    energies = [*sorted({a.edge_energy_j for a in figures}), 0.0]
    ttfts = sorted({a.ttft_ms for a in figures})
    ttfts = [ttfts[0] / 2, *ttfts, 0.0]  # below every expert: refused
    return [Budget(ttft_ms=t, energy_j=e) for t in ttfts for e in energies]


def test_the_router_places_on_the_top_expert_of_the_brute_force_selection() -> None:
    """Over random gates and queues, at every budget of the grid: the router serves the brute-force
    optimum's top expert (the gate's prior), names exactly its subset with weights summing to 1, and
    refuses exactly where no subset fits; the device the gate does not know is never an expert."""
    rng = np.random.default_rng(0)
    served = refused = largest = 0
    devices = set()
    for seed in range(20):
        table = random_table(seed)
        candidates = fleet(tuple(int(q) for q in rng.integers(0, 3, size=5)))
        router = Moe2Router(table)
        for budget in grid(candidates):
            want = expected(table, candidates, budget)
            if want is None:
                with pytest.raises(BudgetUnsatisfiable):
                    router.choose(candidates, TOKENS, MAX_TOKENS, budget)
                refused += 1
                continue
            choice = router.choose(candidates, TOKENS, MAX_TOKENS, budget)
            assert choice.candidate is want[0], (seed, budget)
            assert sorted(e for e, _ in choice.experts) == want[1]
            assert choice.experts[0][0] == expert_id(choice.candidate)
            assert math.isclose(sum(w for _, w in choice.experts), 1.0)
            assert [w for _, w in choice.experts] == sorted((w for _, w in choice.experts), reverse=True)
            assert choice.candidate.device_id != "laptop" and choice.within_budget
            served += 1
            devices.add(choice.candidate.device_id)
            largest = max(largest, len(choice.experts))
    assert served > 200 and refused > 0  # the grid holds both
    assert len(devices) == 4 and largest >= 2  # every expert serves somewhere; some subsets hold several


def designed_table(candidates: list[Candidate]) -> ExpertTable:
    """The edge expert hungriest in energy is the best on every request and the gate's favourite."""
    energies = {f"{c.model}/{c.quant}": weigh(c, TOKENS, MAX_TOKENS, 0, 0.95)[1].edge_energy_j for c in candidates}
    best = max(energies, key=energies.get)
    losses = np.array([[1.0 if v == best else 1.5 + 0.1 * i for i, v in enumerate(VARIANTS)]] * 4)
    weights = np.array([[0.6 if v == best else 0.1 for v in VARIANTS]] * 4)
    return ExpertTable(VARIANTS, FAMILIES, weights, losses, np.full(4, 100.0))


def test_requests_with_different_budgets_land_on_different_experts() -> None:
    edges = fleet()[:3]
    router = Moe2Router(designed_table(edges))
    loose = router.choose(edges, TOKENS, MAX_TOKENS, Budget())
    energies = sorted(weigh(c, TOKENS, MAX_TOKENS, 0, 0.95)[1].edge_energy_j for c in edges)
    tight = Budget(energy_j=math.sqrt(energies[-1] * energies[-2]))  # all but the hungriest
    cheap = router.choose(edges, TOKENS, MAX_TOKENS, tight)
    assert loose.candidate.device_id != cheap.candidate.device_id
    assert loose.experts == ((expert_id(loose.candidate), 1.0),)  # the rest add nothing: one expert
    assert (cheap.admitted or cheap.estimate).edge_energy_j <= tight.energy_j


def test_selections_are_cached_per_fleet_and_recomputed_when_a_device_goes_offline() -> None:
    table, candidates = random_table(3), fleet()
    router = Moe2Router(table)
    budget = Budget()
    first = router.choose(candidates, TOKENS, MAX_TOKENS, budget)
    again = router.choose(candidates, TOKENS, MAX_TOKENS, budget)
    assert (router.misses, router.hits) == (1, 1)
    assert again.candidate is first.candidate and again.experts == first.experts

    gone = first.candidate.device_id
    left = [c for c in candidates if c.device_id != gone]  # its device went offline
    after = router.choose(left, TOKENS, MAX_TOKENS, budget)
    assert (router.misses, router.hits) == (2, 1) and len(router._cache) == 1  # the old fleet's entries went
    assert after.candidate.device_id != gone
    assert all(not e.startswith(f"{gone or 'cloud'}/") for e, _ in after.experts)
    want = expected(table, left, budget)
    assert want is not None and after.candidate is want[0]

    busy = [c if c.kind == "cloud" else dataclasses.replace(c, queued=2) for c in left]  # queues moved
    router.choose(busy, TOKENS, MAX_TOKENS, budget)
    assert router.misses == 3


@pytest.mark.parametrize(("budget", "binding"), [
    (Budget(energy_j=1e-9), "energy_j"), (Budget(ttft_ms=1e-6), "ttft_ms"), (Budget(tpot_ms=1e-6), "tpot_ms"),
])  # fmt: skip
def test_a_budget_no_subset_meets_names_its_binding_constraint(budget: Budget, binding: str) -> None:
    edges = fleet()[:3]  # no cloud: it spends no edge energy
    with pytest.raises(BudgetUnsatisfiable, match=f"binding constraint {binding}") as info:
        Moe2Router(random_table(1)).choose(edges, TOKENS, MAX_TOKENS, budget)
    assert info.value.binding == binding and info.value.considered
    closest = dataclasses.replace(budget, best_effort=True)
    best_effort = Moe2Router(random_table(1)).choose(edges, TOKENS, MAX_TOKENS, closest)
    assert not best_effort.within_budget  # a failover's budget: the closest placement serves


def test_candidates_the_gate_does_not_know_go_to_the_budget_router() -> None:
    unknown = fleet()[4:]
    choice = Moe2Router(random_table(0)).choose(unknown, TOKENS, MAX_TOKENS, Budget())
    plain = BudgetRouter().choose(unknown, TOKENS, MAX_TOKENS, Budget())
    assert choice.candidate is plain.candidate and choice.experts == ()
    with pytest.raises(BudgetUnsatisfiable, match="no device is online"):
        Moe2Router(random_table(0)).choose([], TOKENS, MAX_TOKENS, Budget())


def test_the_hub_setting_chooses_the_policy(tmp_path: Path) -> None:
    assert isinstance(make_router(HubConfig(data_dir=tmp_path)), BudgetRouter)  # the default
    with pytest.raises(ValueError, match="moe2_table and moe2_gate are for router_policy 'moe2'"):
        make_router(HubConfig(data_dir=tmp_path, moe2_gate=tmp_path / "g.pt"))  # not silently ignored
    with pytest.raises(ValueError, match="needs moe2_table"):
        make_router(HubConfig(data_dir=tmp_path, router_policy="moe2"))
    with pytest.raises(ValueError, match="unknown router_policy"):
        make_router(HubConfig(data_dir=tmp_path, router_policy="fastest"))
    path = random_table(0).save(tmp_path / "t.npz")
    router = make_router(HubConfig(data_dir=tmp_path, router_policy="moe2", moe2_table=path))
    assert isinstance(router, Moe2Router) and router.table.variants == VARIANTS
    np.savez(tmp_path / "bad.npz", weights=np.ones((2, 2)))
    with pytest.raises(TableError, match="not an expert table"):
        ExpertTable.load(tmp_path / "bad.npz")


# -- end to end ------------------------------------------------------------------------------------------

PROMPT = "the cat sat in a hat"
E2E_TOKENS = 8
BIG = TinySpec(arch="llama", n_layers=4, dim=128, ffn_dim=384, n_heads=4, n_kv_heads=2, head_dim=32)


async def test_moe2_hub_places_by_budget_names_experts_and_reselects_when_a_device_leaves(tmp_path: Path) -> None:
    """Agents "big" (best on the gate's calibration requests but for one, the gate's favourite) and
    "small" (cheaper). Unconstrained, the subset is both and the gate's prior sends the request to big;
    an energy budget between their predictions sends it to small alone; the answer (SDK and OpenAI API)
    names the experts and weights. With big's device gone, the same request is re-selected and served
    on small."""
    big = ServedModel("big", load(write_tiny_gguf(tmp_path / "big.gguf", BIG), use_cache=False))
    small = ServedModel("small", load(write_tiny_gguf(tmp_path / "small.gguf", TinySpec()), use_cache=False))
    qb, qs = big.info["quant"], small.info["quant"]
    # requests 0-2: big is better and favoured; request 3: small is (so the pair beats either alone)
    table = ExpertTable(
        (f"big/{qb}", f"small/{qs}", "absent/fp32"), ("big", "small", "absent"),
        np.array([[0.6, 0.3, 0.1]] * 3 + [[0.2, 0.7, 0.1]]),
        np.array([[1.0, 1.4, 2.0]] * 3 + [[1.5, 1.2, 2.0]]), np.full(4, 40.0),
    )  # fmt: skip
    path = table.save(tmp_path / "table.npz")
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none", http_listen="127.0.0.1:0",
                           router_policy="moe2", moe2_table=path) as hub:  # fmt: skip
        assert hub.service is not None
        router = hub.service.router
        assert isinstance(router, Moe2Router)
        a = await start_served_agent(hub, big, tmp_path / "a", "a")
        b = await start_served_agent(hub, small, tmp_path / "b", "b")
        big_id, small_id = f"{a.device_id}/big/{qb}", f"{b.device_id}/small/{qs}"
        tokens = prompt_from_value(PROMPT).routing_tokens

        def between() -> float:
            """An energy budget between the two experts' predictions as the router weighs them now."""
            weighed, _ = router.experts(hub.service.placements.candidates("", False), tokens, E2E_TOKENS, Budget())
            energy = {e.id: e.energy_j for _, e, *_ in weighed}
            assert energy[big_id] > 2 * energy[small_id] > 0, energy
            return math.sqrt(energy[big_id] * energy[small_id])

        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            loose = await client.generate(PROMPT, max_tokens=E2E_TOKENS)
            tight = await client.generate(PROMPT, max_tokens=E2E_TOKENS, budget=Budget(energy_j=between()))
            async with httpx.AsyncClient(base_url=f"http://{hub.http_address}", timeout=30) as http:
                body = {"model": "small", "prompt": PROMPT, "max_tokens": 4}
                answer = await http.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}"})
            misses = router.misses
            served = hub.service.metrics.registry.get_sample_value(
                "tandem_moe2_overhead_seconds_count", {"features": "prior"}
            )  # the hub's histogram: each MoE² choice's overhead (no gate: the prior's weights)
            await a.close()  # big's device leaves
            await wait_for(lambda: hub.fleet.status_of(a.device_id) == "offline")
            after = await client.generate(PROMPT, max_tokens=E2E_TOKENS)
        await b.close()

    assert loose.placement is not None and loose.placement.device_id == a.device_id
    assert [e.expert for e in loose.placement.experts] == [big_id, small_id]
    assert [round(e.weight, 4) for e in loose.placement.experts] == [round(0.5 / 0.9, 4), round(0.4 / 0.9, 4)]
    assert tight.placement is not None and tight.placement.device_id == b.device_id
    assert [(e.expert, e.weight) for e in tight.placement.experts] == [(small_id, 1.0)]
    assert loose.completion_tokens > 0 and tight.completion_tokens > 0
    assert answer.status_code == 200, answer.text
    assert answer.json()["tandem"]["placements"][0]["experts"] == [{"expert": small_id, "weight": 1.0}]
    assert after.placement is not None and after.placement.device_id == b.device_id
    assert [(e.expert, e.weight) for e in after.placement.experts] == [(small_id, 1.0)]
    assert after.completion_tokens > 0 and router.misses > misses  # selected again, without big
    assert served is not None and served >= 3
