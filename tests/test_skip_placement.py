"""Early layer skipping chosen by the hub's placement (issue 21): each trained ratio's measured quality
on the wire, the router's time-per-token estimate for the layers that run, a quality_floor turning
skipping on where the unmodified model would miss a tight TPOT budget, and end to end through a real
hub and agent serving a tiny six-layer llama."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from cloud_hub.calibrations import WARMUP_REQUESTS, Tracker
from cloud_hub.candidates import Candidate, KVOption, SkipOption
from cloud_hub.errors import BudgetUnsatisfiable
from cloud_hub.estimates import estimate
from cloud_hub.hub_requests import Final
from cloud_hub.openai_answer import tandem_info
from cloud_hub.placements import skip_options
from cloud_hub.prompt import prompt_from_value
from cloud_hub.registry import model_record
from cloud_hub.router import Budget, BudgetRouter
from cloud_hub.server import Hub
from cloud_hub.variants import may_skip, skip_params
from device_profiles import Calibration, load_profile
from models.loaded import LoadedModel
from models.runtime import load
from models.sampling import SamplingParams
from models.serving import ServedModel
from models.skip import Routers, RouterSet, RouterSpec, SkipVariant
from partitioner import calibration as cal
from partitioner import split
from partitioner.cost import ModelCost
from partitioner.predict import compute_ms
from tandem import AsyncClient
from tandem import BudgetUnsatisfiable as SDKBudgetUnsatisfiable
from tandem.client import _fold
from tandem.types import GenerateResult
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import skip_variant_message
from tests.hubkit import running_hub, start_served_agent
from tests.test_cost import SMOLLM2
from tests.tiny import TinySpec, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

COST = ModelCost.from_config(SMOLLM2, bits_per_weight=32.0)  # 30 layers
PROMPT_TOKENS, NEW_TOKENS = 200, 32
FIFTH = SkipOption(0.2, 6, agreement=0.93)
TWO_FIFTHS = SkipOption(0.4, 12, agreement=0.85)


# -- the model side and the wire --------------------------------------------------------------------


def test_variants_report_each_ratio_and_its_measured_agreement() -> None:
    spec = RouterSpec("m", "fp32", 6, 8)

    def routers(ratio: float, record: dict) -> Routers:
        return Routers(spec, torch.zeros(6, 8), torch.zeros(6), frozenset({0, 5}), (), {"ratio": ratio, **record})

    rs = RouterSet({0.5: routers(0.5, {"agreement": 0.8}), 0.34: routers(0.34, {})})  # the second: old routers
    assert rs.variants() == [SkipVariant(0.34, 2, 0.0), SkipVariant(0.5, 3, 0.8)]


@dataclass(frozen=True)
class Variant:
    """The fields of models.skip.SkipVariant, as the agent and the hub's backend hand them to the wire."""

    ratio: float
    layers: int
    agreement: float


def test_skip_variants_cross_the_wire_and_the_registry_and_the_sdk_reads_the_hubs_choice() -> None:
    info = pb.ModelInfo.FromString(
        pb.ModelInfo(name="m", skip_variants=[skip_variant_message(**vars(Variant(0.3, 9, 0.9)))]).SerializeToString()
    )
    assert skip_options(info.skip_variants) == (SkipOption(0.3, 9, 0.9),)  # float32 rounded back: 0.9 meets 0.9
    kept = pb.ModelInfo.FromString(pb.ModelInfo(**model_record(info)).SerializeToString())
    assert skip_options(kept.skip_variants) == (SkipOption(0.3, 9, 0.9),)  # as the registry keeps it

    placement = pb.Placement(kind="edge", device_id="pi", skip_ratio=0.25)
    metrics = pb.Metrics(skipped_layers=[2, 3])
    result = GenerateResult()
    _fold(result, pb.GenerateResponse(finish_reason="length", placements=[placement], metrics=metrics))
    assert result.placement is not None and result.placement.skip_ratio == 0.25 and result.skipped_layers == [2, 3]
    info_json = tandem_info(Final("length", (placement,), metrics, ("length",)))  # the OpenAI answer's tandem
    assert info_json["placements"][0]["skip_ratio"] == 0.25 and info_json["skipped_layers"] == [2, 3]


# -- the estimate -----------------------------------------------------------------------------------


def edge(device: str, variants: tuple[SkipOption, ...] = (), tracker: Tracker | None = None, **kw: object) -> Candidate:
    return Candidate(
        "edge", device, load_profile("cpu-2core"), "smollm2", COST, tracker=tracker, skip_variants=variants, **kw
    )


def tpot(c: Candidate) -> float:
    return estimate(c, PROMPT_TOKENS, NEW_TOKENS).tpot_ms


def test_the_tpot_estimate_scales_the_decode_step_to_the_layers_that_run() -> None:
    profile = load_profile("cpu-2core")
    p, d = cal.prior(profile)
    calibration = Calibration("smollm2", "fp32", "cpu", (0.01, p[1] * 1.7, p[2]), (0.3, d[1] * 0.8, d[2]), 2.0, 5.0)
    context = PROMPT_TOKENS + NEW_TOKENS / 2
    block, head = split.layer_decode_ms(profile, COST, context), split.head_decode_ms(profile, COST, context)
    share = head / (30 * block + head)  # the head's share of a step runs whatever is skipped
    for calibrated, fixed in ((calibration, 0.3), (None, 0.0)):  # a step's fixed cost runs whatever is skipped
        prefill, step = compute_ms(profile, COST, calibrated, PROMPT_TOKENS, context)
        skip_prefill, skip_step = compute_ms(profile, COST, calibrated, PROMPT_TOKENS, context, skip_layers=12)
        assert skip_prefill == prefill  # prefill runs every layer
        assert skip_step == pytest.approx(fixed + (step - fixed) * (share + (1 - share) * 18 / 30), rel=1e-12)
    # the router's estimate, link alike: only the decode step differs, calibrated or roofline
    _, step = compute_ms(profile, COST, calibration, PROMPT_TOKENS, context)
    c = edge("cpu", (TWO_FIFTHS,), Tracker(calibration))
    skipping = replace(c, skip=TWO_FIFTHS)
    assert tpot(c) - tpot(skipping) == pytest.approx((step - 0.3) * (1 - share) * 12 / 30, rel=1e-9)
    assert estimate(skipping, PROMPT_TOKENS, NEW_TOKENS).ttft_ms == estimate(c, PROMPT_TOKENS, NEW_TOKENS).ttft_ms
    roofline = edge("cpu", (FIFTH, TWO_FIFTHS))
    assert tpot(replace(roofline, skip=TWO_FIFTHS)) < tpot(replace(roofline, skip=FIFTH)) < tpot(roofline)


# -- the router -------------------------------------------------------------------------------------


def tight(c: Candidate, variant: SkipOption) -> Budget:
    """A TPOT budget the unmodified model misses and `variant` meets."""
    return Budget(tpot_ms=(tpot(replace(c, skip=variant)) + tpot(c)) / 2)


def test_the_router_turns_skipping_on_where_the_unmodified_model_misses() -> None:
    c = edge("cpu", (FIFTH, TWO_FIFTHS))
    budget = tight(c, FIFTH)
    with pytest.raises(BudgetUnsatisfiable, match="binding constraint tpot_ms"):
        BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, budget)  # no quality_floor: unchanged
    choice = BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, replace(budget, quality_floor=0.9))
    assert choice.within_budget and choice.candidate.skip == FIFTH
    assert choice.estimate.tpot_ms == pytest.approx(tpot(replace(c, skip=FIFTH)))
    assert [s[0].skip for s in choice.considered] == [None, FIFTH]  # 0.4's agreement is under 0.9
    # both qualify and both fit: the fewest skipped layers
    both = BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, replace(budget, quality_floor=0.8))
    assert both.candidate.skip == FIFTH and [s[0].skip for s in both.considered] == [None, FIFTH, TWO_FIFTHS]
    # only the deeper one fits
    deeper = replace(tight(replace(c, skip=FIFTH), TWO_FIFTHS), quality_floor=0.8)
    assert BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, deeper).candidate.skip == TWO_FIFTHS


def test_a_quality_floor_above_every_variant_leaves_the_tpot_budget_unmet() -> None:
    c = edge("cpu", (FIFTH, TWO_FIFTHS))
    with pytest.raises(BudgetUnsatisfiable, match="binding constraint tpot_ms") as info:
        BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, replace(tight(c, FIFTH), quality_floor=0.95))
    assert info.value.binding == "tpot_ms" and all(s[0].skip is None for s in info.value.considered)
    hopeless = Budget(tpot_ms=tpot(replace(c, skip=TWO_FIFTHS)) / 2, quality_floor=0.5)
    with pytest.raises(BudgetUnsatisfiable, match=r"tpot_ms .*skipping 12 layers \(ratio 0.4\)"):
        BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, hopeless)  # the closest is named with its variant


def test_the_unmodified_model_is_preferred_and_skipping_stays_on_real_edge_devices() -> None:
    c, other = edge("cpu", (FIFTH,)), edge("other", (FIFTH,))
    loose = Budget(tpot_ms=tpot(c) * 1.5, quality_floor=0.5)
    choice = BudgetRouter().choose([c, other], PROMPT_TOKENS, NEW_TOKENS, loose)
    assert choice.within_budget and choice.candidate.skip is None
    assert {s[0].skip for s in choice.considered} == {None, FIFTH}  # weighed, and ranked after
    # an unmodified cloud placement that fits ranks after an edge variant that fits
    cloud = Candidate("cloud", "", load_profile("cloud-h100"), "smollm2", COST, skip_variants=(FIFTH,))
    budget = replace(tight(c, FIFTH), quality_floor=0.9)
    assert BudgetRouter().choose([c, cloud], PROMPT_TOKENS, NEW_TOKENS, budget).candidate.skip == FIFTH
    weighed = BudgetRouter().choose([cloud], PROMPT_TOKENS, NEW_TOKENS, replace(budget, best_effort=True)).considered
    assert [s[0].skip for s in weighed] == [None]  # the hub turns it on at the edge only
    paced = edge("emulated", (FIFTH,), emulated=True)  # it paces decode to its profile's whole step
    weighed = BudgetRouter().choose([paced], PROMPT_TOKENS, NEW_TOKENS, replace(budget, best_effort=True)).considered
    assert [s[0].skip for s in weighed] == [None]
    predicting = edge("kv", (FIFTH,), kv=KVOption(0.5, (0, 2), 0.99))  # an explicit kv_prediction's candidate
    weighed = BudgetRouter().choose([predicting], 8, 4, replace(budget, best_effort=True)).considered
    assert [(s[0].kv is not None, s[0].skip) for s in weighed] == [(True, None)]


def test_the_hub_never_adds_skipping_where_the_request_forbids_it() -> None:
    assert may_skip(SamplingParams(max_tokens=4, logprobs=2))
    for refused in ({"skip_ratio": 0.2}, {"kv_prediction": 0.5}, {"n": 2}, {"prompt_logprobs": 0}):
        params = SamplingParams(max_tokens=4, **refused)
        assert not may_skip(params), refused
        assert skip_params(edge("cpu", (FIFTH,), skip=FIFTH), params) is params
    params = SamplingParams(max_tokens=8)
    assert skip_params(edge("cpu", (FIFTH,), skip=FIFTH), params).skip_ratio == 0.2  # the work the agent gets
    assert skip_params(edge("cpu", (FIFTH,)), params) is params


def test_skipped_requests_refit_no_decode_correction() -> None:
    profile = load_profile("cpu-2core")
    placement = pb.Placement(kind="edge", predicted_tpot_ms=5.0, skip_ratio=0.4)  # the hub chose skipping
    metrics = pb.Metrics(prompt_tokens=50, completion_tokens=10, ttft_ms=40, tpot_ms=3.0, prefill_ms=30, decode_ms=2.5)
    skipped, whole = Tracker(requests=WARMUP_REQUESTS), Tracker(requests=WARMUP_REQUESTS)  # past warm-up
    skipped.observe(profile, COST, False, placement, metrics, 10, skip_layers=12)
    whole.observe(profile, COST, False, placement, metrics, 10)
    assert skipped.decode.state() == Tracker().decode.state() != whole.decode.state()
    assert skipped.prefill.state() == whole.prefill.state()  # full-depth prefill: learnt as any
    assert list(skipped.tpot.ratios or ()) == [pytest.approx(0.6)]  # predicted with skipping: it counts
    # The caller's own skip_ratio: predicted unskipped, so its time per token does not count.
    own = Tracker(requests=WARMUP_REQUESTS)
    own.observe(profile, COST, False, pb.Placement(kind="edge", predicted_tpot_ms=5.0), metrics, 10, skip_layers=12)
    assert not own.tpot.ratios


# -- end to end -------------------------------------------------------------------------------------

RATIO, PROTECTED = 0.5, frozenset({0, 5})
"""round(0.5 x 6) = 3 of the 4 layers the routers may skip (0 and 5 are protected)."""
AGREEMENT = 0.9
"""What the routers' record says was measured (random routers here; train_set measures it)."""
WIDE = TinySpec(arch="llama", n_layers=6, dim=256, ffn_dim=768, n_heads=4, n_kv_heads=2, head_dim=64,
                context_length=512)  # fmt: skip
"""Wide enough that the blocks, not the head, are most of a decode step."""
PROMPT, MAX_TOKENS = "the cat sat in a hat", 12


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("skip-placement") / "wide.gguf", WIDE)


def with_routers(path: Path) -> LoadedModel:
    loaded = load(path, use_cache=False)
    L, D = loaded.config.n_layers, loaded.config.dim
    weight = torch.randn(L, D, generator=torch.Generator().manual_seed(3))
    record = {"ratio": RATIO, "agreement": AGREEMENT}
    routers = Routers(RouterSpec("six", loaded.served_quant, L, D), weight, torch.zeros(L), PROTECTED, (), record)
    loaded.routers = RouterSet({RATIO: routers})
    return loaded


def admitted_tpots(hub: Hub, floor: float) -> dict[float | None, float]:
    """The TPOT the hub's own router admits "six" at for PROMPT, unmodified (None) and with its skip
    variant (by ratio): the candidates and the estimates routing uses now, weighed best-effort."""
    assert hub.service is not None
    tokens = prompt_from_value(PROMPT).routing_tokens
    candidates = hub.service.placements.candidates("six", False)
    choice = hub.service.router.choose(candidates, tokens, MAX_TOKENS, Budget(quality_floor=floor, best_effort=True))
    return {c.skip.ratio if c.skip else None: adm.tpot_ms for c, _, adm, _ in choice.considered}


async def test_a_quality_floor_turns_skipping_on_for_a_tight_tpot(tmp_path: Path, wide: Path) -> None:
    """A TPOT budget between the unmodified model's admitted prediction and skipping's: refused
    without a quality_floor (no cloud to fall back on), served on the agent skipping with one, and
    the answer says which layers it skipped."""
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        agent = await start_served_agent(hub, ServedModel("six", with_routers(wide)), tmp_path / "a", "a")
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            advertised = (await client.devices())[0].models[0].skip_variants
            assert [(v.ratio, v.layers, v.agreement) for v in advertised] == [(RATIO, 3, pytest.approx(AGREEMENT))]
            admitted = admitted_tpots(hub, AGREEMENT)  # before any request: nothing measured moves them yet
            assert set(admitted) == {None, RATIO}
            assert admitted[None] > 1.3 * admitted[RATIO], admitted  # 3 of 6 blocks, the head alike
            budget = Budget(tpot_ms=math.sqrt(admitted[None] * admitted[RATIO]))

            with pytest.raises(SDKBudgetUnsatisfiable, match="binding constraint tpot_ms") as refused:
                await client.generate(PROMPT, model="six", max_tokens=MAX_TOKENS, budget=budget)
            assert refused.value.binding == "tpot_ms"

            tracker = hub.fleet.calibrations.get(agent.device_id, "six")
            decode = tracker.decode.state()
            floor = replace(budget, quality_floor=AGREEMENT)
            result = await client.generate(PROMPT, model="six", max_tokens=MAX_TOKENS, budget=floor)
            assert hub.fleet.calibrations.get(agent.device_id, "six").decode.state() == decode  # not refitted
        await agent.close()
    placement = result.placement
    assert placement is not None and (placement.kind, placement.device_id) == ("edge", agent.device_id)
    assert placement.skip_ratio == RATIO and placement.kv_prediction == 0  # the hub's choice
    assert placement.admitted_tpot_ms <= budget.tpot_ms
    assert len(result.skipped_layers) == 3 and not PROTECTED & set(result.skipped_layers), result.skipped_layers
    assert not result.lossless and result.completion_tokens > 0
