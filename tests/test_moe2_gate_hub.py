"""MoE²'s per-prompt gate in the hub (cloud_hub.moe2_gate) and top-k ensembles (Moe2Router at k > 1).

The "embed" features against the model's own embedding layer; a hand-set gate whose weights for two
prompts rank two experts oppositely, so that the prompts land on different experts; k = 2 ensembles
against brute-force selection at k = 2 and objective.route; a gate for another expert set refused at
load; the overhead histogram recorded. Everything on tiny GGUFs and fake fleets: no downloads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from prometheus_client import generate_latest

from cloud_hub.candidates import Candidate
from cloud_hub.estimates import weigh
from cloud_hub.metrics import HubMetrics
from cloud_hub.moe2_gate import PromptGate, prompt_text
from cloud_hub.moe2_router import Moe2Router, expert_id
from cloud_hub.prompt import RequestPrompt, prompt_from_value
from cloud_hub.router import Budget
from cloud_hub.server import HubConfig, make_router
from models.runtime import load
from partitioner.moe2.experts import Budget as MoeBudget
from partitioner.moe2.experts import Expert, Problem, SelectionError
from partitioner.moe2.features import KINDS, TokenEmbedder, embed, prompt_vector
from partitioner.moe2.gate import Gate, GateConfig, GateManifest, GateMismatch, GateNet, checksum
from partitioner.moe2.objective import GatedObjective, route
from partitioner.moe2.select import brute_force
from partitioner.moe2.table import ExpertTable
from tandem import AsyncClient
from tandem_cli import hub as hub_cli
from tandem_cli.main import build_parser
from tests.test_moe2_hub import FAMILIES, MAX_TOKENS, TOKENS, VARIANTS, fleet, random_table
from tests.tiny import TinySpec, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

A, B = "the cat sat in a hat", "0123456789 !? 0123456789"
"""Two prompts whose features differ (digits and letters are different byte tokens)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", TinySpec(embd_quant="Q8_0"))


@pytest.fixture(scope="module")
def embedder(tiny: Path) -> TokenEmbedder:
    return TokenEmbedder(str(tiny))


def hand_gate(embedder: TokenEmbedder, expert_ids: tuple[str, ...], favour: dict[str, np.ndarray]) -> Gate:
    """A linear gate with logits 20 * x . favour[e] (0 for experts not in `favour`), unstandardised."""
    net = GateNet(embedder.dimensions, len(expert_ids), 0)
    weight = np.zeros((len(expert_ids), embedder.dimensions))
    for e, direction in favour.items():
        weight[expert_ids.index(e)] = 20 * direction
    net.body[0].weight.data = torch.from_numpy(weight)
    net.body[0].bias.data.zero_()
    manifest = GateManifest(expert_ids, "embed", embedder.dimensions, GateConfig())
    return Gate(GateManifest(**{**manifest.__dict__, "checksum": checksum(net)}), net)


def softmax_of(gate: Gate, x: np.ndarray) -> np.ndarray:
    """The gate's weights computed by hand: softmax of W x + b (mean 0, scale 1), over its experts."""
    lin = gate.net.body[0]
    z = lin.weight.numpy() @ x.astype(np.float64) + lin.bias.numpy()
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


def test_embed_features_are_the_models_input_embeddings_mean_pooled(tiny: Path, embedder: TokenEmbedder) -> None:
    """Against the loaded model's own embedding layer: the mean over the prompt's tokens, normalised;
    one prompt alone (the hub) is bitwise its row in a batch (training)."""
    model = load(tiny, use_cache=False)
    for text in (A, B):
        ids = model.tokenizer.encode(text)
        with torch.inference_mode():
            want = F.normalize(model.model.embed(torch.tensor([ids]))[0].mean(dim=0), dim=0)
        got = prompt_vector(embedder, text)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-6, atol=1e-6)
    batch = embed(embedder, [A, B, A + B])
    assert np.array_equal(batch[1], prompt_vector(embedder, B)) and batch.shape == (3, embedder.dimensions)
    assert "embed" in KINDS and len(set(KINDS)) == 3


def two_expert_table() -> ExpertTable:
    """Calibration requests where cpu's smollm fp32 (column 2) is best on one and the gate's favourite
    there, nano's gemma int8 (column 3) on the other: the unconstrained optimum holds both."""
    p, q = VARIANTS.index(f"{FAMILIES[2]}/fp32"), VARIANTS.index(f"{FAMILIES[3]}/int8")
    weights, losses = np.full((2, 5), 0.1), np.full((2, 5), 2.0)
    weights[0, p] = weights[1, q] = 0.6
    losses[0, p] = losses[1, q] = 1.0
    return ExpertTable(VARIANTS, FAMILIES, weights, losses, np.full(2, 100.0))


def test_per_prompt_weights_change_the_chosen_expert(embedder: TokenEmbedder) -> None:
    """A gate favouring cpu for prompts like A and nano for prompts like B sends A to cpu and B to nano
    within the same subset; the answer's weights are the prompt's (computed by hand) renormalised over
    it. Without a gate (the prior) both prompts land on one expert; token ids get the prior too."""
    xa, xb = prompt_vector(embedder, A), prompt_vector(embedder, B)
    assert float(xa @ xb) < 0.99  # the prompts' features differ
    p, q = VARIANTS[2], VARIANTS[3]
    gate = hand_gate(embedder, VARIANTS, {p: xa - xb, q: xb - xa})
    table = two_expert_table()
    router = Moe2Router(table, gate=PromptGate(gate, table, embedder))
    candidates = fleet()
    subset = {"cpu/" + p, "nano/" + q}
    for text, x, device in ((A, xa, "cpu"), (B, xb, "nano")):
        choice = router.choose(candidates, TOKENS, MAX_TOKENS, Budget(), prompt=prompt_from_value(text))
        assert choice.candidate.device_id == device and {e for e, _ in choice.experts} == subset
        w = softmax_of(gate, x)
        want = {f"{d}/{v}": w[VARIANTS.index(v)] for d, v in (("cpu", p), ("nano", q))}
        total = sum(want.values())
        for e, share in choice.experts:
            assert math.isclose(share, want[e] / total, rel_tol=1e-9)
        assert choice.ensemble == ()  # k = 1
    plain = Moe2Router(table)
    tops = [plain.choose(candidates, TOKENS, MAX_TOKENS, Budget(), prompt=prompt_from_value(t)) for t in (A, B)]
    assert tops[0].candidate is tops[1].candidate
    ids = prompt_from_value([1, 2, 3])
    assert router.prompt_weights(ids, (2, 3))[1] == "prior" and prompt_text(ids) is None


def expected_k(
    table: ExpertTable, weights: np.ndarray, candidates: list[Candidate], budget: Budget, k: int
) -> tuple[list[tuple[Candidate, float]], list[str]] | None:
    """By brute force at k: the ensemble (the prompt's `weights` over the table's columns, routed by
    objective.route within the optimum) and the optimum's ids; None when no subset fits."""
    mapped = [c for c in candidates if f"{c.model}/{c.quant}" in table.variants]
    cols = [table.variants.index(f"{c.model}/{c.quant}") for c in mapped]
    figures = [weigh(c, TOKENS, MAX_TOKENS, 0, 0.95)[1] for c in mapped]
    experts = tuple(
        Expert(expert_id(c), c.device_id or "cloud", c.model, c.quant, table.tokenizers[col], c.kind,
               a.ttft_ms, a.edge_energy_j, float(table.losses[:, col].mean()))
        for c, col, a in zip(mapped, cols, figures, strict=True)
    )  # fmt: skip
    w = table.weights[:, cols]
    objective = GatedObjective(w / w.sum(axis=1, keepdims=True), table.losses[:, cols],
                               tuple(table.tokenizers[c] for c in cols), table.n_bytes)  # fmt: skip
    limits = MoeBudget(budget.energy_j or None, budget.ttft_ms or None, k)
    try:
        chosen = brute_force(Problem(experts, objective), limits)
    except SelectionError:
        return None
    members = [i for i, e in enumerate(experts) if e.id in chosen.subset]
    picked, mixed = route(weights[cols], [e.tokenizer for e in experts], members, k)
    return [(mapped[i], m) for i, m in zip(picked, mixed, strict=True)], list(chosen.subset)


def test_k2_ensembles_two_experts_of_one_tokenizer_with_routes_weights(embedder: TokenEmbedder) -> None:
    """At k = 2, over random tables, gates and energy budgets: the subset is brute force's at k = 2,
    the ensemble is objective.route's top 2 of it by the prompt's weights (one tokenizer, weights
    summing to 1), and its members' energy together fits the budget."""
    rng = np.random.default_rng(0)
    candidates = fleet()
    figures = {id(c): weigh(c, TOKENS, MAX_TOKENS, 0, 0.95)[1] for c in candidates}
    energies = sorted({a.edge_energy_j for a in figures.values() if a.edge_energy_j > 0})
    budgets = [Budget(experts=2), *(Budget(energy_j=e * f, experts=2) for e in energies for f in (1.0, 1.5, 2.0))]
    pairs = 0
    for seed in range(12):
        table = random_table(seed)
        favour = {v: rng.normal(size=embedder.dimensions) for v in VARIANTS}
        gate = hand_gate(embedder, VARIANTS, favour)
        router = Moe2Router(table, gate=PromptGate(gate, table, embedder))
        prompt = prompt_from_value(A if seed % 2 else B)
        weights = softmax_of(gate, prompt_vector(embedder, str(prompt.value)))
        for budget in budgets:
            want = expected_k(table, weights, candidates, budget, 2)
            if want is None:
                continue
            choice = router.choose(candidates, TOKENS, MAX_TOKENS, budget, prompt=prompt)
            assert sorted(e for e, _ in choice.experts) == want[1], (seed, budget)
            assert choice.candidate is want[0][0][0]
            if len(want[0]) == 1:
                assert choice.ensemble == ()
                continue
            pairs += 1
            assert [c for c, _ in choice.ensemble] == [c for c, _ in want[0]]
            assert choice.ensemble[0][0] is choice.candidate
            assert [w for _, w in choice.ensemble] == pytest.approx([w for _, w in want[0]], rel=1e-12)
            assert math.isclose(sum(w for _, w in choice.ensemble), 1.0)
            assert len({table.tokenizers[table.column(c.model, c.quant)] for c, _ in choice.ensemble}) == 1
            spent = sum(figures[id(c)].edge_energy_j for c, _ in choice.ensemble)
            assert not budget.energy_j or spent <= budget.energy_j
    assert pairs >= 10  # ensembles of two were met, not only single experts


def save_gate(embedder: TokenEmbedder, ids: tuple[str, ...], path: Path) -> Path:
    return hand_gate(embedder, ids, {ids[0]: np.ones(embedder.dimensions)}).save(path)


def test_a_gate_for_another_expert_set_is_refused_at_load(tmp_path: Path, embedder: TokenEmbedder) -> None:
    table = random_table(0)
    table_path = table.save(tmp_path / "t.npz")
    other = save_gate(embedder, (*VARIANTS[:4], "gemma3-270m/int4"), tmp_path / "other.pt")
    fewer = save_gate(embedder, VARIANTS[:4], tmp_path / "fewer.pt")
    for path, names in ((other, "gemma3-270m/int4"), (fewer, VARIANTS[4])):
        with pytest.raises(GateMismatch, match="another expert set than the table's") as info:
            PromptGate.load(path, table)
        assert names in str(info.value)
        cfg = HubConfig(data_dir=tmp_path, router_policy="moe2", moe2_table=table_path, moe2_gate=path)
        with pytest.raises(GateMismatch):
            make_router(cfg)  # what Hub.start calls first: the hub does not start
    same = Gate.load(save_gate(embedder, tuple(reversed(VARIANTS)), tmp_path / "same.pt"))
    served = PromptGate(same, table, embedder)  # the same set in another order: served in the table's
    assert served.gate.expert_ids == VARIANTS and served.kind == "embed"


def count(metrics: HubMetrics, features: str) -> float:
    value = metrics.registry.get_sample_value("tandem_moe2_overhead_seconds_count", {"features": features})
    return value or 0.0


def test_the_overhead_is_recorded_per_choice(tmp_path: Path, embedder: TokenEmbedder) -> None:
    """Each MoE² choice observes its time once, labelled by the weights' source; a request handed to
    the BudgetRouter (no expert) records nothing. make_router wires the hub's metrics."""
    table = two_expert_table()
    metrics = HubMetrics()
    gate = hand_gate(embedder, VARIANTS, {VARIANTS[2]: np.ones(embedder.dimensions)})
    router = Moe2Router(table, gate=PromptGate(gate, table, embedder), observe=metrics.observe_moe2_overhead)
    chat: RequestPrompt = prompt_from_value([{"role": "user", "content": A}])
    for prompt in (prompt_from_value(A), chat, prompt_from_value([1, 2]), None):
        router.choose(fleet(), TOKENS, MAX_TOKENS, Budget(), prompt=prompt)
    router.choose(fleet()[4:], TOKENS, MAX_TOKENS, Budget())  # no expert: the BudgetRouter's
    assert (count(metrics, "embed"), count(metrics, "prior")) == (2.0, 2.0)
    took = metrics.registry.get_sample_value("tandem_moe2_overhead_seconds_sum", {"features": "embed"})
    assert took is not None and 0 < took < 1.0
    assert b"tandem_moe2_overhead_seconds_bucket" in generate_latest(metrics.registry)

    cfg = HubConfig(data_dir=tmp_path, router_policy="moe2", moe2_table=table.save(tmp_path / "t.npz"))
    hub_metrics = HubMetrics()
    make_router(cfg, hub_metrics).choose(fleet(), TOKENS, MAX_TOKENS, Budget(), prompt=prompt_from_value(A))
    assert count(hub_metrics, "prior") == 1.0


def test_hub_up_takes_the_gate_beside_the_table() -> None:
    args = build_parser().parse_args(["hub", "up", "--router-policy", "moe2", "--moe2-table", "g.table.npz",
                                      "--moe2-gate", "g.pt"])  # fmt: skip
    cfg = hub_cli._hub_config(args)
    assert (cfg.moe2_table, cfg.moe2_gate) == (Path("g.table.npz"), Path("g.pt"))
    assert hub_cli._hub_config(build_parser().parse_args(["hub", "up"])).moe2_gate is None


async def test_the_hub_prepares_a_routers_prompt_work_off_its_event_loop(tmp_path: Path) -> None:
    """A router that reads the prompt (MoE²'s gate: a forward pass) gets `prepare` in a worker thread
    before `choose`, which runs on the loop; a router without it is not called at all."""
    import threading

    from cloud_hub.router import BudgetRouter
    from tests.hubkit import running_hub, start_agent, tiny_llama

    calls: list[tuple[str, str]] = []

    class Reading(BudgetRouter):
        def prepare(self, prompt) -> None:  # type: ignore[no-untyped-def]
            calls.append(("prepare", threading.current_thread().name))

        def choose(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(("choose", threading.current_thread().name))
            return super().choose(*args, **kwargs)

    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        agent = await start_agent(hub, tiny_llama(tmp_path), tmp_path / "a", "a")
        hub.service.router = Reading()
        try:
            async with AsyncClient(hub.address, api_key=hub.registry.create_api_key("t")) as client:
                await client.generate("the cat", max_tokens=2)
        finally:
            await agent.close()
    (kind0, thread0), (kind1, thread1) = calls
    assert (kind0, kind1) == ("prepare", "choose") and thread0 != thread1 == threading.main_thread().name
