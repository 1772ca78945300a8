"""KV prediction through the wire, the SDK, the OpenAI-compatible API and the hub's placement (no
models: the variants are plain values here; the model side has its own tests)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from cloud_hub.calibrations import Tracker
from cloud_hub.candidates import Candidate, KVOption
from cloud_hub.errors import BudgetUnsatisfiable
from cloud_hub.errors import InvalidRequest as HubInvalidRequest
from cloud_hub.estimates import estimate
from cloud_hub.openai_requests import BudgetBody, TandemExtension
from cloud_hub.placements import kv_options
from cloud_hub.registry import model_record
from cloud_hub.router import Budget, BudgetRouter
from cloud_hub.upstream import _check_supported
from device_profiles import Calibration, load_profile
from models.sampling import KV_DEPTHS, SamplingParams
from partitioner import calibration as cal
from partitioner.cost import ModelCost, kv_predictor_layers
from partitioner.predict import compute_ms
from tandem import Client, InvalidRequest
from tandem.client import KV_DEPTHS as SDK_KV_DEPTHS
from tandem.client import _fold, build_request
from tandem.types import GenerateResult
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import kv_report_kwargs, kv_variant_message, sampling_kwargs, sampling_message, set_kv_report
from tests.test_cost import SMOLLM2

PROMPT = "the cat sat in a hat"
COST = ModelCost.from_config(SMOLLM2, bits_per_weight=32.0)  # 30 layers
PROMPT_TOKENS, NEW_TOKENS = 400, 32


@dataclass(frozen=True)
class Variant:
    """The fields of models.kvpred.KVVariant, as the agent and the hub's backend hand them to the wire."""

    depth: float
    aux_layers: tuple[int, ...]
    agreement: float
    bpb_ratio: float
    prefill_share: float


QUARTER = KVOption(0.25, tuple(range(0, 30, 4)), agreement=0.9, bpb_ratio=1.06, prefill_share=0.27)
HALF = KVOption(0.5, tuple(range(0, 30, 2)), agreement=0.96, bpb_ratio=1.02, prefill_share=0.52)


# -- the wire ---------------------------------------------------------------------------------------


def test_sampling_carries_kv_prediction_and_repair_both_ways() -> None:
    for depth, repair in ((0.0, False), *((d, r) for d in KV_DEPTHS for r in (False, True))):
        params = SamplingParams(max_tokens=16, kv_prediction=depth, kv_repair=repair)
        wire = pb.Sampling.FromString(sampling_message(**vars(params)).SerializeToString())
        assert SamplingParams(**sampling_kwargs(wire)) == params  # float32 on the wire holds every depth exactly
    assert (sampling_kwargs(pb.Sampling())["kv_prediction"], sampling_kwargs(pb.Sampling())["kv_repair"]) == (0, False)


def test_variants_reports_and_budgets_cross_the_wire() -> None:
    v = Variant(0.25, (0, 4, 8, 12), agreement=0.9, bpb_ratio=1.04, prefill_share=0.53)
    info = pb.ModelInfo.FromString(
        pb.ModelInfo(name="m", kv_variants=[kv_variant_message(**vars(v))]).SerializeToString()
    )
    # the hub's copy: float32 figures rounded back, so an agreement of 0.9 meets a quality_floor of 0.9
    assert kv_options(info.kv_variants) == (KVOption(0.25, (0, 4, 8, 12), 0.9, 1.04, 0.53),)
    assert kv_options(pb.ModelInfo.FromString(pb.ModelInfo(**model_record(info)).SerializeToString()).kv_variants) == (
        KVOption(0.25, (0, 4, 8, 12), 0.9, 1.04, 0.53),
    )  # as the registry keeps it
    for repaired_at in (None, 0, 7):  # 0 (repaired before the first token) is not "never"
        metrics = pb.Metrics()
        set_kv_report(metrics, depth=0.5, predicted=37, repaired_at=repaired_at)
        assert kv_report_kwargs(pb.Metrics.FromString(metrics.SerializeToString())) == {
            "depth": 0.5,
            "predicted": 37,
            "repaired_at": repaired_at,
        }
    assert kv_report_kwargs(pb.Metrics()) is None
    request = build_request(PROMPT, kv_prediction=0.5, kv_repair=True, budget=Budget(ttft_ms=80, quality_floor=0.9))
    assert (request.sampling.kv_prediction, request.sampling.kv_repair) == (0.5, True)
    assert request.budget.quality_floor == 0.9 and request.budget.ttft_ms == 80


def test_the_sdk_reads_the_kv_report_and_the_hubs_choice() -> None:
    metrics = pb.Metrics(kv_depth=0.25, kv_predicted=120, kv_repaired_at=0)
    placement = pb.Placement(kind="edge", device_id="pi", kv_prediction=0.25)
    result = GenerateResult()
    _fold(result, pb.GenerateResponse(finish_reason="length", placements=[placement], metrics=metrics))
    assert (result.kv_depth, result.kv_predicted, result.kv_repaired_at) == (0.25, 120, 0)
    assert result.placement is not None and result.placement.kv_prediction == 0.25
    _fold(result, pb.GenerateResponse(finish_reason="length", metrics=pb.Metrics()))
    assert (result.kv_depth, result.kv_predicted, result.kv_repaired_at) == (0.0, 0, None)


# -- the SDK and the API refuse bad options before routing ------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kv_prediction": 0.3}, r"kv_prediction must be 0 or one of 0.25, 0.5, 0.75 .*got 0.3"),
        ({"kv_prediction": -0.25}, r"kv_prediction must be 0 or one of .*got -0.25"),
        ({"kv_prediction": float("nan")}, r"kv_prediction must be .*got nan"),
        ({"kv_prediction": "0.25"}, r"kv_prediction must be 0 or one of"),
        ({"kv_prediction": True}, r"kv_prediction must be 0 or one of"),
        ({"kv_repair": True}, r"kv_repair repairs a predicted cache: set kv_prediction"),
        ({"kv_prediction": 0.25, "skip_ratio": 0.25}, r"kv_prediction and skip_ratio are one at a time"),
        ({"budget": Budget(quality_floor=1.5)}, r"budget.quality_floor must be a number in \[0, 1\].*got 1.5"),
        ({"budget": Budget(quality_floor=-0.1)}, r"budget.quality_floor must be .*got -0.1"),
        ({"budget": Budget(quality_floor=float("nan"))}, r"budget.quality_floor must be .*got nan"),
    ],
)
def test_sdk_refuses_bad_kv_options_before_sending(options: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as exc:
        build_request(PROMPT, **options)
    assert exc.value.code == "INVALID_ARGUMENT"
    with Client("127.0.0.1:1", timeout=1) as client, pytest.raises(InvalidRequest, match=message):  # no hub there
        client.generate(PROMPT, **options)


def test_sdk_depths_are_the_models_and_the_api_and_the_upstream_refuse_what_they_cannot_serve() -> None:
    assert SDK_KV_DEPTHS == KV_DEPTHS
    assert TandemExtension(kv_prediction=0.75, kv_repair=True).kv_prediction == 0.75
    with pytest.raises(ValidationError, match=r"(?s)kv_prediction.*must be 0 or one of 0.25, 0.5, 0.75"):
        TandemExtension(kv_prediction=0.3)
    with pytest.raises(ValidationError, match="quality_floor"):
        BudgetBody(quality_floor=1.5)
    with pytest.raises(HubInvalidRequest, match="kv_prediction: m is served by an upstream server here, without KV"):
        _check_supported(SamplingParams(max_tokens=4, kv_prediction=0.25), "m")


# -- placement --------------------------------------------------------------------------------------


def edge(device: str, variants: tuple[KVOption, ...] = (), tracker: Tracker | None = None) -> Candidate:
    return Candidate("edge", device, load_profile("cpu-2core"), "smollm2", COST, tracker=tracker, kv_variants=variants)


def ttft(c: Candidate) -> float:
    return estimate(c, PROMPT_TOKENS, NEW_TOKENS).ttft_ms


def test_kv_estimate_prefills_only_the_auxiliary_layers_then_one_step() -> None:
    profile = load_profile("cpu-2core")
    p, d = cal.prior(profile)
    calibration = Calibration("smollm2", "fp32", "cpu", (0.01, p[1] * 1.7, p[2]), (0.3, d[1] * 0.8, d[2]), 2.0, 5.0)
    context = PROMPT_TOKENS + NEW_TOKENS / 2
    whole, step = compute_ms(profile, COST, calibration, PROMPT_TOKENS, context)
    kv, kv_step = compute_ms(profile, COST, calibration, PROMPT_TOKENS, context, kv_layers=8)
    expected = (
        calibration.request_ms
        + (8 + kv_predictor_layers(COST)) * cal.layer_prefill_ms(calibration, COST, PROMPT_TOKENS)
        + cal.decode_ms(calibration, COST, PROMPT_TOKENS)
    )
    assert kv == pytest.approx(expected, rel=1e-12) and kv_step == step and kv < whole / 2
    c = edge("cpu", (QUARTER,), Tracker(calibration))
    plain, predicted = ttft(c), ttft(replace(c, kv=QUARTER))
    assert plain - predicted == pytest.approx(whole - kv, rel=1e-9)  # the router's estimate, link alike
    roofline = edge("cpu", (QUARTER,))
    assert ttft(replace(roofline, kv=QUARTER)) < ttft(replace(roofline, kv=HALF)) < ttft(roofline)


def tight(c: Candidate, variant: KVOption) -> Budget:
    """A TTFT budget the unmodified model misses and `variant` meets."""
    fast, slow = ttft(replace(c, kv=variant)), ttft(c)
    return Budget(ttft_ms=(fast + slow) / 2)


def test_the_router_turns_kv_prediction_on_where_the_unmodified_model_misses() -> None:
    c = edge("cpu", (HALF, QUARTER))
    budget = tight(c, QUARTER)
    with pytest.raises(BudgetUnsatisfiable, match="binding constraint ttft_ms"):
        BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, budget)  # no quality_floor: unchanged
    choice = BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, replace(budget, quality_floor=0.85))
    assert choice.within_budget and choice.candidate.kv == QUARTER  # the fastest variant over the floor
    assert choice.estimate.ttft_ms == pytest.approx(ttft(replace(c, kv=QUARTER)))
    assert {s[0].kv for s in choice.considered} == {None, QUARTER}
    above = replace(budget, quality_floor=0.95, best_effort=True)  # 0.25's agreement is below it
    assert {s[0].kv for s in BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, above).considered} == {None, HALF}


def test_a_quality_floor_above_every_variant_leaves_the_budget_unmet() -> None:
    c = edge("cpu", (HALF, QUARTER))
    budget = replace(tight(c, QUARTER), quality_floor=0.99)
    with pytest.raises(BudgetUnsatisfiable, match="binding constraint ttft_ms") as info:
        BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, budget)
    assert info.value.binding == "ttft_ms" and all(s[0].kv is None for s in info.value.considered)
    # a variant that qualifies but misses too is named as the closest placement
    hopeless = Budget(ttft_ms=ttft(replace(c, kv=QUARTER)) / 2, quality_floor=0.5)
    with pytest.raises(BudgetUnsatisfiable, match=r"ttft_ms .*with KV prediction at depth 0.25"):
        BudgetRouter().choose([c], PROMPT_TOKENS, NEW_TOKENS, hopeless)


def test_the_unmodified_model_is_preferred_when_it_meets_the_budget() -> None:
    c, other = edge("cpu", (QUARTER,)), edge("other", (QUARTER,))
    loose = Budget(ttft_ms=ttft(c) * 1.5, quality_floor=0.5)
    choice = BudgetRouter().choose([c, other], PROMPT_TOKENS, NEW_TOKENS, loose)
    assert choice.within_budget and choice.candidate.kv is None
    assert {s[0].kv for s in choice.considered} == {None, QUARTER}  # weighed, and ranked after
    cloud = Candidate("cloud", "", load_profile("cloud-h100"), "smollm2", COST, kv_variants=(QUARTER,))
    alone = BudgetRouter().choose(
        [cloud], PROMPT_TOKENS, NEW_TOKENS, Budget(ttft_ms=1e-3, quality_floor=0.5, best_effort=True)
    )
    assert [s[0].kv for s in alone.considered] == [None]  # the hub turns it on at the edge only


def spec(depth: float, model: str = "", device: str = "") -> SimpleNamespace:
    return SimpleNamespace(params=SamplingParams(kv_prediction=depth), model=model, device=device)


def test_an_explicit_depth_goes_only_where_it_is_trained() -> None:
    from cloud_hub.variants import kv_params, predicting

    plain, quarter, both = edge("plain"), edge("quarter", (QUARTER,)), edge("both", (QUARTER, HALF))
    able = predicting([plain, quarter, both], spec(0.5), first=True)  # type: ignore[arg-type]
    assert [(c.device_id, c.kv) for c in able] == [("both", HALF)]
    choice = BudgetRouter().choose(able, PROMPT_TOKENS, NEW_TOKENS, Budget())
    assert choice.estimate.ttft_ms == pytest.approx(ttft(replace(both, kv=HALF)))  # estimated at that depth
    message = r"kv_prediction: no device serves KV prediction at depth 0.75 for model 'smollm2' \(trained depths "
    with pytest.raises(HubInvalidRequest, match=message + r"there: 0.25, 0.5; train them: tandem models train-kv\)"):
        predicting([plain, quarter, both], spec(0.75, "smollm2"), first=True)  # type: ignore[arg-type]
    with pytest.raises(HubInvalidRequest, match=r"on device .plain. \(none has predictors"):
        predicting([plain], spec(0.25, device="plain"), first=True)  # type: ignore[arg-type]
    assert predicting([plain], spec(0.25), first=False) == []  # a failover: the usual "nothing left" errors
    # the work sent to the agent: the hub's choice set, the caller's own kept, nothing without a variant
    params = SamplingParams(max_tokens=8)
    assert kv_params(replace(quarter, kv=QUARTER), params).kv_prediction == 0.25
    assert kv_params(quarter, params) is params
    own = SamplingParams(max_tokens=8, kv_prediction=0.5)
    assert kv_params(replace(both, kv=HALF), own) is own


def test_an_emulated_device_paces_a_predicted_prompt_to_what_the_hub_predicts() -> None:
    """An agent emulating a profile holds the first token of a KV-predicted prompt to the cost
    model's KV prefill (its auxiliary layers, then one step), not to the whole prefill."""
    from edge_agent.pacing import floor_pacer, profile_pacer
    from partitioner.cost import decode_ms, kv_prefill_ms, prefill_ms

    profile = load_profile("cpu-2core")
    pace = floor_pacer(profile_pacer(profile, COST), 1.0)
    whole, predicted = pace(PROMPT_TOKENS, 8, None), pace(PROMPT_TOKENS, 8, 8)
    assert whole.ttft_ms == pytest.approx(prefill_ms(profile, COST, PROMPT_TOKENS))
    assert predicted.ttft_ms == pytest.approx(kv_prefill_ms(profile, COST, PROMPT_TOKENS, 8))
    assert predicted.ttft_ms < whole.ttft_ms / 2 and predicted.tpot_ms == whole.tpot_ms
    assert kv_prefill_ms(profile, COST, PROMPT_TOKENS, 8) > decode_ms(profile, COST, PROMPT_TOKENS)
    assert 1.0 < kv_predictor_layers(COST) < 3.0  # SmolLM2: 30 maps of 576 x 384 against 3.5M MACs a layer


def test_the_hub_turns_kv_prediction_on_only_where_the_request_allows_it() -> None:
    """A quality floor never makes the hub add KV prediction to a request the agent would refuse
    with it: layer skipping, several choices, prompt logprobs."""
    from cloud_hub.variants import may_predict

    assert may_predict(SamplingParams(max_tokens=4))
    assert may_predict(SamplingParams(max_tokens=4, logprobs=2, constraint='{"type": "json_object"}'))
    for refused in ({"skip_ratio": 0.2}, {"n": 2}, {"prompt_logprobs": 0}):
        assert not may_predict(SamplingParams(max_tokens=4, **refused)), refused


def test_a_registry_row_from_a_newer_replica_still_lists_its_model() -> None:
    """Replicas share one registry during a rolling upgrade: a row with a field this hub's protocol
    does not know yet is listed without it, not refused."""
    from cloud_hub.registry import model_info

    info = pb.ModelInfo(name="m", quant="int4", n_layers=6, kv_variants=[kv_variant_message(**vars(QUARTER))])
    row = {**model_record(info), "from_a_newer_hub": [1, 2]}
    back = model_info(row)
    assert (back.name, back.quant, back.n_layers, len(back.kv_variants)) == ("m", "int4", 6, 1)
    assert back.config_json == ""  # the row's config stays in the registry
