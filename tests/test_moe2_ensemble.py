"""MoE² ensembles (k > 1): the hub mixes its members' next-token distributions step by step
(cloud_hub.ensemble), the members running on their own devices; greedy text equals a local mixture
of the same models with the same weights."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch

from cloud_hub.ensemble import mix
from cloud_hub.router import BudgetRouter, Choice, Router
from models.runtime import load
from models.serving import ServedModel
from models.stage import Stage
from partitioner.moe2.dataset import Variant, load_variant
from tandem import AsyncClient, Budget
from tandem.types import GenerateResult
from tests.conftest import real_model
from tests.hubkit import running_hub, start_served_agent

MODEL = "smollm2-135m-instruct"
PROMPT = "The history of the Python programming language begins in"


def test_mix_is_the_weighted_mixture_of_the_members_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(50, generator=gen) * 4 for _ in range(3))
    w = [0.5, 0.3, 0.2]
    got = mix([a, b, c], w)
    want = sum(wi * torch.softmax(x.double(), -1) for wi, x in zip(w, (a, b, c), strict=True))
    assert torch.allclose(got.double().exp(), want, rtol=1e-6, atol=0)
    assert got.dtype == torch.float32 and got.shape == (50,)
    # a member with weight 0 drops out; one member at weight 1 is its own distribution
    assert torch.allclose(mix([a, b], [1.0, 0.0]), torch.log_softmax(a, -1), atol=1e-6)
    # one member sure of a token another rules out (-inf): the mixture keeps it at its weight
    sure = torch.full((50,), -math.inf)
    sure[7] = 0.0
    assert mix([sure, a], [0.25, 0.75])[7].exp().item() >= 0.25
    with pytest.raises(ValueError, match="sum to 1"):
        mix([a, b], [0.5, 0.6])
    with pytest.raises(ValueError, match="2 members' logits for 3 weights"):
        mix([a, b], [0.2, 0.3, 0.5])


class _Ensemble(Router):
    """The budget router's choice, with an ensemble of the named devices ("" the hub) and weights: the
    execution under test, whatever router picks the members (cloud_hub.moe2_router does in service)."""

    def __init__(self, members: list[tuple[str, float]]) -> None:
        self.members, self.inner = members, BudgetRouter()

    def choose(self, candidates, prompt_tokens, max_tokens, budget, template_tokens=0, prompt=None) -> Choice:  # type: ignore[no-untyped-def]
        by_device = {c.device_id: c for c in candidates}
        if any(d not in by_device for d, _ in self.members):  # a member is gone (a failover): one placement
            return self.inner.choose(candidates, prompt_tokens, max_tokens, budget, template_tokens)
        chosen = tuple((by_device[d], w) for d, w in self.members)
        base = self.inner.choose([chosen[0][0]], prompt_tokens, max_tokens, budget, template_tokens)
        experts = tuple((f"{c.device_id or 'cloud'}/{c.model}/{c.quant}", w) for c, w in chosen)
        return Choice(chosen[0][0], base.estimate, True, base.admitted, base.quantile, base.considered, experts, chosen)


def reference(models: list[torch.nn.Module], weights: list[float], ids: list[int], n: int) -> list[int]:
    """Greedy decoding of the mixture, locally: each model over all its layers, logits mixed."""
    stages = [Stage(m, 0, m.cfg.n_layers, len(ids) + n) for m in models]
    logits = [s.logits(s.run(tokens=ids)) for s in stages]
    out = []
    for _ in range(n):
        token = int(torch.argmax(mix(logits, weights)))
        out.append(token)
        logits = [s.logits(s.run(tokens=[token])) for s in stages]
    return out


async def test_an_ensemble_answers_as_the_local_mixture_of_its_members(tmp_path: Path) -> None:
    real_model(MODEL, "source")  # skips (or fails under make test) without the weights
    weights = [0.25, 0.6, 0.15]  # the pruned member weighs most: the mixture is not the whole model
    async with running_hub(tmp_path / "hub", cloud_model=MODEL, mqtt="none", http_listen="127.0.0.1:0") as hub:
        a = await start_served_agent(hub, ServedModel(MODEL, load(MODEL, quant="source")), tmp_path / "a", "a")
        pruned = load_variant(Variant(MODEL, "int8", drop_layers=8))  # a member whose distribution differs
        b = await start_served_agent(hub, ServedModel(MODEL, pruned), tmp_path / "b", "b")
        ida, idb = a.device_id, b.device_id
        hub.service.router = _Ensemble([(ida, weights[0]), (idb, weights[1]), ("", weights[2])])
        key = hub.registry.create_api_key("t")
        try:
            async with AsyncClient(hub.address, api_key=key) as client:
                got = await client.generate(PROMPT, model=MODEL, max_tokens=12, budget=Budget(experts=3))
                async with httpx.AsyncClient(timeout=60) as http:  # the OpenAI API's extension says it too
                    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                            "tandem": {"budget": {"experts": 3}}}  # fmt: skip
                    web = await http.post(f"http://{hub.http_address}/v1/completions", json=body,
                                          headers={"Authorization": f"Bearer {key}"})  # fmt: skip
                # the members are free again: a plain request to each runs at once
                hub.service.router = BudgetRouter()
                alone = await client.generate(PROMPT, model=MODEL, max_tokens=12, device=ida)
        finally:
            await a.close()
            await b.close()
    assert [(p.kind, p.device_id) for p in got.placements] == [("edge", ida), ("edge", idb), ("cloud", "")]
    assert web.status_code == 200, web.text
    assert web.json()["choices"][0]["text"] == got.text and len(web.json()["tandem"]["placements"]) == 3
    assert [e.weight for e in got.placements[0].experts] == pytest.approx(weights)
    assert got.energy_j > 0  # the agents' members report theirs
    source = real_model(MODEL, "source")
    ids = source.tokenizer.encode(PROMPT)
    models = [source.model, load_variant(Variant(MODEL, "int8", drop_layers=8)).model, source.model]
    want = reference(models, weights, ids, 12)
    assert list(got.token_ids) == want
    assert got.text == source.tokenizer.decode(want)
    assert alone.placements[0].device_id == ida and alone.text  # nothing left held by the ensemble
    # the mixture is not any member alone: the pruned member's share moves the greedy text
    assert want != reference([source.model, source.model], [0.5, 0.5], ids, 12)


async def test_a_member_that_drops_mid_answer_is_left_out_and_the_answer_completes(tmp_path: Path) -> None:
    """The pruned member's agent leaves after a few tokens: the request fails over to a placement
    without it (not without the top expert), goes on from the tokens so far, and the hub keeps serving."""
    real_model(MODEL, "source")
    async with running_hub(tmp_path / "hub", cloud_model=MODEL, mqtt="none") as hub:
        a = await start_served_agent(hub, ServedModel(MODEL, load(MODEL, quant="source")), tmp_path / "a", "a")
        b = await start_served_agent(hub, ServedModel(MODEL, load(MODEL, quant="int8")), tmp_path / "b", "b")
        ida, idb = a.device_id, b.device_id
        hub.service.router = _Ensemble([(ida, 0.5), (idb, 0.5)])
        key = hub.registry.create_api_key("t")
        try:
            async with AsyncClient(hub.address, api_key=key) as client:
                result, seen = GenerateResult(), 0
                async for _ in client.stream(
                    PROMPT, model=MODEL, max_tokens=16, budget=Budget(experts=2), result=result
                ):
                    seen += 1
                    if seen == 3:
                        await b.close()  # the second member's device leaves mid-answer
                again = await client.generate(PROMPT, model=MODEL, max_tokens=4, device=ida)
        finally:
            await a.close()
    placed = [(p.kind, p.device_id) for p in result.placements]
    assert placed[:2] == [("edge", ida), ("edge", idb)] and len(placed) == 3, placed
    assert placed[2][1] != idb  # the member that failed is left out, not the top expert
    assert result.completion_tokens == 16 and result.finish_reason == "length"
    assert again.text and again.placements[0].device_id == ida


async def test_a_moe2_hub_mixes_the_two_experts_its_selection_picks_at_k_2(tmp_path: Path) -> None:
    """End to end with the MoE² router itself: a table in which each of two variants is the better one
    on half the requests, so that at k = 2 the exact selection mixes both (one alone loses a bit per
    byte on half of them). The answer names both, and equals the local mixture with the gate's weights."""
    import numpy as np

    from partitioner.moe2.table import ExpertTable, variant_id

    # an agent at source precision advertises its tensors' detail; the variant is "source" all the same
    assert variant_id(MODEL, "source(q4_1->int4,q8_0->int8)") == f"{MODEL}/source"
    real_model(MODEL, "source")
    variants = (f"{MODEL}/source", f"{MODEL}/int8")
    losses = np.array([[0.8, 1.2] if r % 2 else [1.2, 0.8] for r in range(16)])
    table = ExpertTable(variants, (MODEL, MODEL), np.full((16, 2), 0.5), losses, np.full(16, 100.0))
    path = table.save(tmp_path / "table.npz")
    async with running_hub(tmp_path / "hub", cloud_model=MODEL, cloud_quant="fp32", mqtt="none",
                           router_policy="moe2", moe2_table=path) as hub:  # fmt: skip
        a = await start_served_agent(hub, ServedModel(MODEL, load(MODEL, quant="source")), tmp_path / "a", "a")
        b = await start_served_agent(hub, ServedModel(MODEL, load(MODEL, quant="int8")), tmp_path / "b", "b")
        key = hub.registry.create_api_key("t")
        try:
            async with AsyncClient(hub.address, api_key=key) as client:
                got = await client.generate(PROMPT, model=MODEL, max_tokens=12, budget=Budget(experts=2))
                one = await client.generate(PROMPT, model=MODEL, max_tokens=4, budget=Budget(experts=1))
        finally:
            await a.close()
            await b.close()
    assert sorted(p.device_id for p in got.placements) == sorted([a.device_id, b.device_id])
    assert [e.weight for e in got.placements[0].experts] == pytest.approx([0.5, 0.5])
    assert len(one.placements) == 1  # k = 1: one expert answers
    source = real_model(MODEL, "source")
    by_device = {a.device_id: source.model, b.device_id: real_model(MODEL, "int8").model}
    models = [by_device[p.device_id] for p in got.placements]
    ids = source.tokenizer.encode(PROMPT)
    assert list(got.token_ids) == reference(models, [0.5, 0.5], ids, 12)
