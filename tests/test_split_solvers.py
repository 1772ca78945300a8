"""The split solvers (partitioner/split.py) against brute force, the roofline they split, and their refusals.

The brute force here is written from the request model in split.py's docstring as whole-path sums
(the text over the links before the first stage, hidden states over the links between the first and
the last stage, the token id back down them), not from the solvers' device-local parts, and it
enumerates every assignment of layers.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from device_profiles import DeviceProfile, Efficiency, LinkSpec, load_profile
from models.config import ModelConfig
from partitioner.cost import MEMORY_HEADROOM, ModelCost, decode_ms, predict, prefill_ms
from partitioner.split import (
    Plan,
    PlanError,
    head_decode_ms,
    head_prefill_ms,
    hidden_bytes,
    layer_decode_ms,
    layer_prefill_ms,
    pipeline,
    single_cut,
    stage_memory_bytes,
    transfer_ms,
)
from tests.test_cost import GEMMA_LIKE, SMOLLM2

REL = 1e-9
SHIPPED = ("jetson-orin-nano", "cloud-h100", "raspberry-pi-5", "cpu-2core")
LAN = LinkSpec(rtt_ms=1, uplink_mbps=1000, downlink_mbps=1000)
SLOW = LinkSpec(rtt_ms=100, uplink_mbps=5, downlink_mbps=5)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


# -- random instances -------------------------------------------------------------------------------------


def rand_link(rng: random.Random) -> LinkSpec:
    return LinkSpec(rng.uniform(0, 150), 10 ** rng.uniform(0, 4), 10 ** rng.uniform(0, 4))


def rand_cost(rng: random.Random, max_layers: int) -> ModelCost:
    dim = rng.choice([64, 256, 576, 2048, 4096])
    q = dim
    kv = dim // rng.choice([1, 3, 4, 8]) or 64
    ffn = dim * rng.choice([2, 3, 4])
    attn = dim * q + 2 * dim * kv + q * dim
    n = rng.randint(1, max_layers)
    sliding = rng.random() < 0.3
    return ModelCost(
        n_layers=n,
        layer_params=attn + 3 * dim * ffn + 2 * dim,
        layer_matmul_params=attn + 3 * dim * ffn,
        embed_params=rng.choice([300, 32000, 49152, 128256]) * dim,
        head_params=rng.choice([300, 32000, 49152, 128256]) * dim,
        tied=rng.random() < 0.5,
        final_norm_params=dim,
        attn_width=q,
        kv_width=kv,
        bits_per_weight=rng.choice([4.5, 8.5, 16.0, 32.0]),
        kv_bits=rng.choice([16.0, 32.0]),
        sliding_window=rng.choice([16, 512]) if sliding else 0,
        sliding_layers=rng.randint(0, n) if sliding else 0,
    )


def rand_profile(rng: random.Random, cost: ModelCost, name: str) -> DeviceProfile:
    """Memory sized around the model (sometimes too small for any part of it)."""
    return DeviceProfile(
        name=name,
        description="random",
        kind=rng.choice(["edge", "cloud"]),
        memory_gb=cost.memory_bytes(4096) / 1e9 * 10 ** rng.uniform(-1.5, 0.5),
        memory_bandwidth_gbs=10 ** rng.uniform(0.5, 3.5),
        compute_tflops=10 ** rng.uniform(-1.5, 3),
        power_active_w=rng.uniform(2, 700),
        power_idle_w=1.0,
        backends=("torch",),
        link=rand_link(rng),
        efficiency=Efficiency(rng.uniform(0.1, 1), rng.uniform(0.1, 1)),
    )


def rand_request(rng: random.Random) -> tuple[int, int, str]:
    return rng.randint(1, 2048), rng.randint(1, 256), rng.choice(["fp16", "int8"])


# -- the brute force --------------------------------------------------------------------------------------


def memory(cost: ModelCost, start: int, end: int, context: int, first: bool, last: bool) -> float:
    byte = cost.bits_per_weight / 8
    kv = 2 * cost.kv_width * cost.kv_bits / 8 * context  # K and V of one layer
    held = (end - start) * (cost.layer_params * byte + kv)
    table = cost.embed_params * byte if first else 0.0
    head = (cost.final_norm_params + (0 if cost.tied and first else cost.head_params)) * byte if last else 0.0
    return held + table + head


def figures(devices, links, cost, prompt, new, wire, cuts) -> dict:
    """Every figure of one assignment, as whole-path sums; `fits` whether every stage fits in memory."""
    n, d = cost.n_layers, len(devices)
    bounds = (0, *cuts, n)
    held = [i for i in range(d) if bounds[i + 1] > bounds[i]]
    f, last = held[0], held[-1]
    hidden = {"fp16": 2 * cost.final_norm_params + 4, "int8": cost.final_norm_params + 4}[wire]
    context, mean = prompt + new, prompt + new / 2
    pre, dec = [0.0] * d, [0.0] * d
    fits, energy = True, 0.0
    for i in held:
        p, count = devices[i][1], bounds[i + 1] - bounds[i]
        pre[i] = count * layer_prefill_ms(p, cost, prompt) + (head_prefill_ms(p, cost, prompt) if i == last else 0)
        dec[i] = count * layer_decode_ms(p, cost, mean) + (head_decode_ms(p, cost, mean) if i == last else 0)
        mem = memory(cost, bounds[i], bounds[i + 1], context, i == f, i == last)
        fits = fits and mem <= (1 - MEMORY_HEADROOM) * p.memory_gb * 1e9
        if p.kind == "edge":
            energy += p.power_active_w * (pre[i] + (new - 1) * dec[i]) / 1e3
    text = sum(transfer_ms(links[e], 4.0 * prompt, "up") for e in range(f))
    ttft = text + sum(pre) + sum(transfer_ms(links[e], prompt * hidden, "up") for e in range(f, last))
    up = [transfer_ms(links[e], hidden, "up") for e in range(d - 1)]
    down = [transfer_ms(links[e], 4.0, "down") for e in range(d - 1)]
    tpot = sum(dec) + sum(up[e] + down[e] for e in range(f, last))
    busy = [dec[i] + (up[i] if i < last else 0) + (down[i - 1] if i > f else 0) for i in range(f, last + 1)]
    return {"ttft_ms": ttft, "tpot_ms": tpot, "energy_j": energy, "bottleneck_ms": max(busy), "fits": fits}


def all_cuts(n: int, d: int) -> list[tuple[int, ...]]:
    return list(itertools.combinations_with_replacement(range(n + 1), d - 1))


def check_best(plan: Plan, rows: list[tuple[tuple[int, ...], dict]], objective: str) -> None:
    """The plan's value is the least of `rows` (cuts, figures), and it is that row when the least is
    unique by more than rounding; its own figures equal the brute force's for its cuts."""
    values = sorted((fig[objective], cuts) for cuts, fig in rows)
    value = plan.edge_energy_j if objective == "energy_j" else getattr(plan, objective)
    assert close(value, values[0][0]), (value, values[0])
    if len(values) == 1 or values[1][0] > values[0][0] * (1 + 1e-6) + 1e-12:
        assert plan.cuts == values[0][1]
    mine = dict(rows)[plan.cuts]
    assert mine["fits"]
    got = {"ttft_ms": plan.ttft_ms, "tpot_ms": plan.tpot_ms, "energy_j": plan.edge_energy_j}
    got["bottleneck_ms"] = plan.bottleneck_ms
    assert all(close(got[k], mine[k]) for k in got), (got, mine)


def brute_binding(rows: list[dict], limits: dict[str, float]) -> str | None:
    """None when some row meets every limit; else the router's rule: the row with the least largest
    value/limit ratio names its largest ratio ("memory" when no row fits)."""
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        return "memory"
    ratios = [{k: r[k] / v for k, v in limits.items() if v} for r in fitting]
    if any(all(x <= 1 for x in q.values()) for q in ratios):
        return None
    closest = min(ratios, key=lambda q: max(q.values()))
    return max(closest, key=closest.get)


# -- the roofline in parts --------------------------------------------------------------------------------


def bounds_binding(p: DeviceProfile, cost: ModelCost, prompt: int, context: float) -> set[str]:
    """Which bound binds prefill and decode: "prefill:flops" or "prefill:bytes", "decode:..." likewise."""
    flops_rate, bytes_rate = (
        p.compute_tflops * 1e12 * p.efficiency.prefill,
        p.memory_bandwidth_gbs * 1e9 * p.efficiency.decode,
    )
    pre = cost.prefill_flops(prompt) / flops_rate >= cost.weight_bytes_per_token / bytes_rate
    dec = (
        cost.flops_per_token(round(context)) / flops_rate
        > (cost.weight_bytes_per_token + cost.kv_bytes_per_token * cost.keys_read(context) / cost.n_layers) / bytes_rate
    )
    return {f"prefill:{'flops' if pre else 'bytes'}", f"decode:{'flops' if dec else 'bytes'}"}


def test_parts_sum_to_the_roofline() -> None:
    """n_layers x layer + head is cost.predict's prefill and decode, on the shipped profiles and on
    random ones, with each bound binding somewhere (the split follows whichever binds)."""
    seen: set[str] = set()
    costs = [ModelCost.from_config(SMOLLM2), ModelCost.from_config(SMOLLM2, 16), ModelCost.from_config(GEMMA_LIKE, 4.5)]
    for name, cost, prompt, new in itertools.product(SHIPPED, costs, (1, 8, 512, 4096), (1, 256)):
        p = load_profile(name)
        est = predict(p, cost, prompt, new)
        mean = prompt + new / 2
        assert close(
            cost.n_layers * layer_prefill_ms(p, cost, prompt) + head_prefill_ms(p, cost, prompt), est.prefill_ms
        )
        assert close(cost.n_layers * layer_decode_ms(p, cost, mean) + head_decode_ms(p, cost, mean), est.decode_ms)
        seen |= bounds_binding(p, cost, prompt, mean)
    rng = random.Random(16)
    for _ in range(300):
        cost = rand_cost(rng, 30)
        p = rand_profile(rng, cost, "r")
        prompt, ctx = rng.randint(1, 8192), rng.uniform(1, 8192)
        pre = cost.n_layers * layer_prefill_ms(p, cost, prompt) + head_prefill_ms(p, cost, prompt)
        assert close(pre, prefill_ms(p, cost, prompt))
        assert close(
            cost.n_layers * layer_decode_ms(p, cost, ctx) + head_decode_ms(p, cost, ctx), decode_ms(p, cost, ctx)
        )
        seen |= bounds_binding(p, cost, prompt, ctx)
    assert seen == {"prefill:flops", "prefill:bytes", "decode:flops", "decode:bytes"}, seen


def test_memory_wire_and_link_figures_by_hand() -> None:
    for cfg in (SMOLLM2, GEMMA_LIKE):
        cost = ModelCost.from_config(cfg, 16)
        assert stage_memory_bytes(cost, 0, cost.n_layers, 1000) == pytest.approx(cost.memory_bytes(1000), rel=REL)
    cost = ModelCost.from_config(SMOLLM2, 16)  # tied: the head's device holds the table again when apart
    split = stage_memory_bytes(cost, 0, 10, 1000) + stage_memory_bytes(cost, 10, 30, 1000)
    assert split == pytest.approx(cost.memory_bytes(1000) + cost.head_params * 2, rel=REL)
    assert hidden_bytes(cost) == 576 * 2 + 4 and hidden_bytes(cost, "int8") == 576 + 4
    assert transfer_ms(LinkSpec(100, 5, 50), 1e6, "up") == pytest.approx(50 + 1600)
    assert transfer_ms(LinkSpec(100, 5, 50), 1e6, "down") == pytest.approx(50 + 160)


# -- solvers against brute force --------------------------------------------------------------------------


def test_single_cut_equals_brute_force() -> None:
    rng = random.Random(1600)
    outcomes = {"plan": 0}
    for _ in range(1000):
        cost = rand_cost(rng, 30)
        edge, cloud = rand_profile(rng, cost, "e"), rand_profile(rng, cost, "c")
        link = rand_link(rng)
        prompt, new, wire = rand_request(rng)
        devices = [("edge", edge), ("cloud", cloud)]
        rows = [((k,), figures(devices, [link], cost, prompt, new, wire, (k,))) for k in range(cost.n_layers + 1)]
        limits = {}
        for b in ("ttft_ms", "tpot_ms", "energy_j"):  # a random quantile of what cuts reach, or none
            values = sorted(r[b] for _, r in rows)
            limits[b] = rng.choice([0.0, 0.0, rng.choice(values) * rng.uniform(0.9, 1.3)])
        objective = rng.choice(["ttft_ms", "tpot_ms", "energy_j"])
        binding = brute_binding([r for _, r in rows], limits)
        try:
            plan = single_cut(edge, cloud, cost, prompt, new, objective=objective, link=link, wire=wire, **limits)
        except PlanError as exc:
            assert exc.binding == binding, (exc, binding)
            outcomes[binding] = outcomes.get(binding, 0) + 1
            continue
        assert binding is None
        ok = [(c, r) for c, r in rows if r["fits"] and all(r[b] <= v for b, v in limits.items() if v)]
        check_best(plan, ok, objective)
        outcomes["plan"] += 1
    assert outcomes["plan"] > 300 and all(outcomes.get(b, 0) > 10 for b in ("memory", "ttft_ms", "tpot_ms")), outcomes


def test_pipeline_equals_brute_force() -> None:
    rng = random.Random(1601)
    counts = {"plan": 0, "memory": 0, "limit": 0}
    for _ in range(1000):
        cost = rand_cost(rng, 12)
        d = rng.randint(1, 4)
        devices = [(f"d{i}", rand_profile(rng, cost, f"p{i}")) for i in range(d)]
        links = [rand_link(rng) for _ in range(d - 1)]
        prompt, new, wire = rand_request(rng)
        rows = [(c, figures(devices, links, cost, prompt, new, wire, c)) for c in all_cuts(cost.n_layers, d)]
        ok = [(c, r) for c, r in rows if r["fits"]]
        for objective in ("ttft_ms", "tpot_ms", "bottleneck_ms"):
            if not ok:
                with pytest.raises(PlanError) as info:
                    pipeline(devices, links, cost, prompt, new, objective=objective, wire=wire)
                assert info.value.binding == "memory"
                counts["memory"] += 1
                continue
            plan = pipeline(devices, links, cost, prompt, new, objective=objective, wire=wire)
            check_best(plan, ok, objective)
            assert [s.device for s in plan.stages] == [devices[i][0] for i in range(d) if _holds(plan, i, cost)]
            counts["plan"] += 1
            limit = getattr(plan, objective) * rng.uniform(0.5, 1.5)
            best = min(r[objective] for _, r in ok)
            if limit < best * (1 - 1e-6):
                with pytest.raises(PlanError) as info:
                    pipeline(devices, links, cost, prompt, new, objective=objective, limit=limit, wire=wire)
                assert info.value.binding == objective
                counts["limit"] += 1
    assert all(v > 100 for v in counts.values()), counts


def _holds(plan: Plan, i: int, cost: ModelCost) -> bool:
    bounds = (0, *plan.cuts, cost.n_layers)
    return bounds[i + 1] > bounds[i]


def test_single_cut_is_the_two_device_pipeline() -> None:
    rng = random.Random(1602)
    for _ in range(200):
        cost = rand_cost(rng, 30)
        edge, cloud = rand_profile(rng, cost, "e"), rand_profile(rng, cost, "c")
        prompt, new, wire = rand_request(rng)
        for objective in ("ttft_ms", "tpot_ms"):
            try:
                cut = single_cut(edge, cloud, cost, prompt, new, objective=objective, wire=wire)
            except PlanError:
                with pytest.raises(PlanError):
                    pipeline([("edge", edge), ("cloud", cloud)], [edge.link], cost, prompt, new, objective=objective)
                continue
            pipe = pipeline([("edge", edge), ("cloud", cloud)], [edge.link], cost, prompt, new, objective=objective,
                            wire=wire)  # fmt: skip
            assert close(getattr(cut, objective), getattr(pipe, objective))


# -- shipped profiles: plans that could go wrong ----------------------------------------------------------


LLAMA8B_LIKE = ModelConfig(
    arch="llama", n_layers=32, dim=4096, ffn_dim=14336, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=128256,
    context_length=8192, norm_eps=1e-5, rope_base=500000.0, rope_local_base=500000.0, tied_embeddings=False,
)  # fmt: skip


def test_slow_link_ships_text_not_hidden_states() -> None:
    """2048 prompt tokens over 100 ms / 5 Mbit/s: the hidden state (2.4 MB fp16, 1.2 MB int8) takes
    seconds, the text (8 KB) milliseconds, so the TTFT cut is cloud-only or edge-only, never between."""
    cost = ModelCost.from_config(SMOLLM2, 16)
    edge, cloud = load_profile("jetson-orin-nano"), load_profile("cloud-h100")
    for wire in ("fp16", "int8"):
        plan = single_cut(edge, cloud, cost, 2048, 64, objective="ttft_ms", link=SLOW, wire=wire)
        assert plan.cuts[0] in (0, cost.n_layers)
        shipped = transfer_ms(SLOW, 2048 * hidden_bytes(cost, wire), "up")
        assert plan.ttft_ms < shipped / 10
        for k in (1, cost.n_layers // 2, cost.n_layers - 1):  # a mid cut waits for the hidden state
            mid = figures([("edge", edge), ("cloud", cloud)], [SLOW], cost, 2048, 64, wire, (k,))
            assert mid["ttft_ms"] > shipped > 10 * plan.ttft_ms
    # With a budget on the first token that only cloud-only meets, energy is still minimised within it.
    pi = load_profile("raspberry-pi-5")
    plan = single_cut(pi, cloud, cost, 2048, 64, objective="energy_j", ttft_ms=200, link=SLOW)
    assert plan.cuts == (0,) and plan.edge_energy_j == 0.0


def test_model_too_big_for_one_device_is_spread_over_enough() -> None:
    cost = ModelCost.from_config(LLAMA8B_LIKE, 16)  # about 16 GB of weights; a Jetson keeps 6.4 GB
    jetson = load_profile("jetson-orin-nano")
    with pytest.raises(PlanError, match="fits in memory") as info:
        pipeline([("a", jetson), ("b", jetson)], [LAN], cost, 512, 128)
    assert info.value.binding == "memory"
    for objective in ("ttft_ms", "tpot_ms", "bottleneck_ms"):
        plan = pipeline([(f"j{i}", jetson) for i in range(4)], [LAN] * 3, cost, 512, 128, objective=objective)
        assert len(plan.stages) >= 3
        assert all(m <= (1 - MEMORY_HEADROOM) * 8e9 for m in plan.memory_bytes)
        assert [s.start for s in plan.stages[1:]] == [s.end for s in plan.stages[:-1]]


def test_throughput_spreads_layers_where_latency_keeps_them_together() -> None:
    cost = ModelCost.from_config(SMOLLM2, 16)
    jetsons = [(f"j{i}", load_profile("jetson-orin-nano")) for i in range(4)]
    latency = pipeline(jetsons, [LAN] * 3, cost, 256, 64, objective="tpot_ms")
    assert [s.device for s in latency.stages] == ["j0"]  # no link beats any link; the first of alike devices
    throughput = pipeline(jetsons, [LAN] * 3, cost, 256, 64, objective="bottleneck_ms")
    assert len(throughput.stages) >= 2 and throughput.bottleneck_ms < latency.bottleneck_ms / 1.5
    slow = pipeline(jetsons, [SLOW] * 3, cost, 256, 64, objective="bottleneck_ms")
    assert len(slow.stages) == 1  # a 50 ms one-way trip outweighs any share of a ~7 ms step


# -- refusals ---------------------------------------------------------------------------------------------


def test_no_plan_names_its_binding_constraint() -> None:
    cost = ModelCost.from_config(SMOLLM2, 16)
    pi, cpu, cloud = load_profile("raspberry-pi-5"), load_profile("cpu-2core"), load_profile("cloud-h100")
    big = ModelCost.from_config(LLAMA8B_LIKE, 32)
    cases = [
        ("memory", dict(edge=pi, cloud=pi, cost=big)),
        ("ttft_ms", dict(edge=pi, cloud=cloud, cost=cost, ttft_ms=1e-3)),
        ("tpot_ms", dict(edge=pi, cloud=cloud, cost=cost, tpot_ms=1e-3)),
        ("energy_j", dict(edge=pi, cloud=cpu, cost=cost, energy_j=1e-6)),  # both edge kind: no free cut
    ]
    for binding, kw in cases:
        with pytest.raises(PlanError, match=binding if binding != "memory" else "fits in memory") as info:
            single_cut(prompt_tokens=512, max_new_tokens=64, **kw)
        assert info.value.binding == binding and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c, p: single_cut(p, p, c, 0, 8), "prompt_tokens"),
        (lambda c, p: single_cut(p, p, c, 8, 0), "max_new_tokens"),
        (lambda c, p: single_cut(p, p, c, 8, 8, ttft_ms=-1), "ttft_ms must be"),
        (lambda c, p: single_cut(p, p, c, 8, 8, tpot_ms=math.nan), "tpot_ms must be"),
        (lambda c, p: single_cut(p, p, c, 8, 8, energy_j=math.inf), "energy_j must be"),
        (lambda c, p: single_cut(p, p, c, 8, 8, objective="bottleneck_ms"), "objective"),
        (lambda c, p: single_cut(p, p, c, 8, 8, wire="fp8"), "wire"),
        (lambda c, p: pipeline([], [], c, 8, 8), "device list is empty"),
        (lambda c, p: pipeline([("a", p), ("b", p)], [], c, 8, 8), "need 1 links"),
        (lambda c, p: pipeline([("a", p), ("a", p)], [LAN], c, 8, 8), "unique"),
        (lambda c, p: pipeline([("a", p)], [], c, 0, 8), "prompt_tokens"),
        (lambda c, p: pipeline([("a", p)], [], c, 8, 8, limit=-5), "limit must be"),
        (lambda c, p: pipeline([("a", p)], [], c, 8, 8, objective="energy_j"), "objective"),
        (lambda c, p: transfer_ms(LAN, 1, "sideways"), "direction"),
    ],
)
def test_bad_inputs_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call(ModelCost.from_config(SMOLLM2, 16), load_profile("jetson-orin-nano"))
    assert not isinstance(info.value, PlanError)
