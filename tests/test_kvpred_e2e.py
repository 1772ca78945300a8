"""KV prediction end to end: a real hub, real agents and a tiny six-layer llama whose predictors are
fitted here (models.kvpred_train.fit on random-token windows, quality measured on held-out ones). The hub
turns KV prediction on for a tight TTFT budget with a quality_floor, serves an explicit
kv_prediction only where predictors are, and the answer (SDK and OpenAI API) says what was predicted."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import httpx
import pytest

from cloud_hub.prompt import prompt_from_value
from cloud_hub.server import Hub
from models import kvpred, kvpred_train
from models.loaded import LoadedModel
from models.runtime import load
from models.sampling import SamplingParams
from models.serving import ServedModel
from tandem import AsyncClient, Budget, BudgetUnsatisfiable, InvalidRequest
from tests.hubkit import running_hub, start_served_agent
from tests.tiny import TinySpec, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTH, AUX = 0.25, (0, 5)
"""The auxiliary model: 2 of the 6 layers (round(0.25 x 6) = 2), the first and the last."""
WIDE = TinySpec(arch="llama", n_layers=6, dim=256, ffn_dim=768, n_heads=4, n_kv_heads=2, head_dim=64,
                context_length=1024)  # fmt: skip
"""Wide enough that prefill, not the link, is most of the TTFT the hub predicts."""


def _text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice((" the", " a", " in")) for _ in range(words))


LONG = _text(700, 7)
"""About 950 tokens (520 as the hub counts text: 4 bytes a token): prefill dominates."""
MEDIUM = _text(60, 8)
"""About 80 tokens: with kv_repair, the cache is the whole model's after a few 32-slot pieces."""
SHORT = "the cat sat in a hat"
"""With the chat template's tokens, about 30: repaired by the second token."""
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("kvpred") / "wide.gguf", WIDE)


@pytest.fixture(scope="module")
def trained(wide: Path) -> kvpred.PredictorSet:
    """Least-squares predictors at depth 0.25 for the model served as "six", on 8 random-token
    windows, their quality measured on 3 held out (what train_set records, at a small scale)."""
    loaded = load(wide, use_cache=False)
    rng = random.Random(0)
    windows = [[rng.randrange(loaded.config.vocab_size) for _ in range(96)] for _ in range(11)]
    spec = kvpred.PredictorSpec.of(loaded.model, "six", loaded.served_quant)
    p = kvpred_train.fit(loaded.model, spec, windows[:8], {DEPTH: AUX})[DEPTH]
    q = kvpred_train.measure(loaded.model, windows[8:], 64, p)
    share = kvpred_train.prefill_share(loaded.model, windows[8:], 64, p)
    assert 0.05 < q.agreement < 1 and math.isfinite(q.ratio), q
    quality = {"agreement": q.agreement, "bpb_ratio": q.ratio, "prefill_share": share}
    return kvpred.PredictorSet({DEPTH: dataclasses.replace(p, record={"quality": quality})})


def floor_of(predictors: kvpred.PredictorSet) -> float:
    """A quality_floor the measured agreement meets (just under it: the wire carries float32)."""
    return math.floor(predictors.for_depth(DEPTH).variant.agreement * 1e4) / 1e4


def with_predictors(path: Path, predictors: kvpred.PredictorSet) -> LoadedModel:
    loaded = load(path, use_cache=False)
    loaded.predictors = predictors
    return loaded


def admitted_ttfts(hub: Hub, prompt: str, floor: float) -> dict[float | None, float]:
    """The TTFT the hub's own router admits "six" at for `prompt`, unmodified (None) and with its KV
    variant (by depth): the candidates and the estimates routing uses now, weighed best-effort."""
    assert hub.service is not None
    tokens = prompt_from_value(prompt).routing_tokens
    candidates = hub.service.placements.candidates("six", False)
    budget = Budget(quality_floor=floor, best_effort=True)
    choice = hub.service.router.choose(candidates, tokens, MAX_TOKENS, budget)
    return {c.kv.depth if c.kv else None: adm.ttft_ms for c, _, adm, _ in choice.considered}


async def test_a_quality_floor_turns_kv_prediction_on_for_a_tight_ttft(
    tmp_path: Path, wide: Path, trained: kvpred.PredictorSet
) -> None:
    """A TTFT budget between the unmodified model's prediction and KV prediction's: refused without a
    quality_floor (no cloud to fall back on), served on the agent with KV prediction with one."""
    floor = floor_of(trained)
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none") as hub:
        agent = await start_served_agent(hub, ServedModel("six", with_predictors(wide, trained)), tmp_path / "a", "a")
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            ttft = admitted_ttfts(hub, LONG, floor)  # before any request: nothing measured moves them yet
            assert set(ttft) == {None, DEPTH}
            assert ttft[None] > 1.5 * ttft[DEPTH], ttft  # 2 layers of 6 and the predictors, then one step
            tight = math.sqrt(ttft[None] * ttft[DEPTH])

            with pytest.raises(BudgetUnsatisfiable, match="binding constraint ttft_ms") as refused:
                await client.generate(LONG, model="six", max_tokens=MAX_TOKENS, budget=Budget(ttft_ms=tight))
            assert refused.value.binding == "ttft_ms"

            budget = Budget(ttft_ms=tight, quality_floor=floor)
            result = await client.generate(LONG, model="six", max_tokens=MAX_TOKENS, budget=budget)
        await agent.close()
    placement = result.placement
    assert placement is not None and (placement.kind, placement.device_id) == ("edge", agent.device_id)
    assert placement.kv_prediction == DEPTH  # the hub's choice
    assert placement.admitted_ttft_ms <= tight < placement.admitted_ttft_ms * 2  # as weighed above, near enough
    assert result.kv_depth == DEPTH and result.kv_predicted == result.prompt_tokens - 1 > 500
    assert result.kv_repaired_at is None and result.completion_tokens > 0


async def test_explicit_kv_prediction_through_the_hub_and_the_openai_api(
    tmp_path: Path, wide: Path, trained: kvpred.PredictorSet
) -> None:
    """Agent "six" has predictors, agent "plain" (the same weights) has none: kv_prediction goes to
    "six" alone, gives the tokens the model gives locally with the same option, and reports what it
    predicted and when repair finished; asked of "plain" it is refused naming kv_prediction."""
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none", http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("t")
        six = with_predictors(wide, trained)
        predicting = await start_served_agent(hub, ServedModel("six", six), tmp_path / "a", "a")
        plain = await start_served_agent(hub, ServedModel("plain", load(wide, use_cache=False)), tmp_path / "b", "b")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            advertised = {d.models[0].name: [v.depth for v in d.models[0].kv_variants] for d in await client.devices()}
            assert advertised == {"six": [DEPTH], "plain": []}

            results = {}
            for repair in (False, True):
                results[repair] = await client.generate(
                    MEDIUM, max_tokens=MAX_TOKENS, kv_prediction=DEPTH, kv_repair=repair
                )  # no model named: the hub finds the one that predicts

            for_plain = r"kv_prediction: no device serves KV prediction at depth 0.25 for model 'plain'"
            with pytest.raises(InvalidRequest, match=for_plain):
                await client.generate(MEDIUM, model="plain", max_tokens=4, kv_prediction=DEPTH)
            on_plain = rf"kv_prediction: .* on device '{plain.device_id}' \(none has predictors"
            with pytest.raises(InvalidRequest, match=on_plain):
                await client.generate(MEDIUM, device=plain.device_id, max_tokens=4, kv_prediction=DEPTH)
            with pytest.raises(InvalidRequest, match=r"kv_prediction: .*at depth 0.5 .*trained depths there: 0.25"):
                await client.generate(MEDIUM, model="six", max_tokens=4, kv_prediction=0.5)

        async with httpx.AsyncClient(base_url=f"http://{hub.http_address}", timeout=30) as http:
            headers = {"authorization": f"Bearer {key}"}
            chat = {"messages": [{"role": "user", "content": SHORT}], "max_tokens": MAX_TOKENS}

            async def post(model: str, tandem: dict) -> httpx.Response:
                body = {**chat, "model": model, "tandem": tandem}
                return await http.post("/v1/chat/completions", json=body, headers=headers)

            answer = await post("six", {"kv_prediction": DEPTH, "kv_repair": True})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            info, usage = body["tandem"], body["usage"]
            assert info["kv_depth"] == DEPTH and info["kv_predicted"] == usage["prompt_tokens"] - 1 > 0
            # Repair takes a chunk of slots a decode step: it is done by then unless the answer ended first.
            pieces = -(-usage["prompt_tokens"] // (kvpred.REPAIR_CHUNK - 1))  # slots gained a step
            if usage["completion_tokens"] > pieces:
                assert isinstance(info["kv_repaired_at"], int) and 0 < info["kv_repaired_at"] <= pieces
            else:
                assert info["kv_repaired_at"] is None or isinstance(info["kv_repaired_at"], int)
            assert info["placements"][0]["device_id"] == predicting.device_id
            unmodified = (await post("six", {})).json()["tandem"]
            assert [unmodified[k] for k in ("kv_depth", "kv_predicted", "kv_repaired_at")] == [0, 0, None]
            refused = await post("plain", {"kv_prediction": DEPTH})
            assert refused.status_code == 400 and "kv_prediction" in refused.json()["error"]["message"], refused.text
        await predicting.close()
        await plain.close()

    reference = six.generator()
    for repair, result in results.items():
        assert result.placement is not None and result.placement.device_id == predicting.device_id
        assert result.placement.kv_prediction == 0  # the caller's own depth is not repeated as the hub's
        params = SamplingParams(max_tokens=MAX_TOKENS, kv_prediction=DEPTH, kv_repair=repair)
        events = list(reference.stream([MEDIUM], params))
        assert result.token_ids == [ev.token_id for ev in events]
        report = events[-1].kv
        assert report is not None and result.kv_depth == report.depth == DEPTH
        assert result.kv_predicted == report.predicted == result.prompt_tokens - 1 > 0
        assert result.kv_repaired_at == report.repaired_at
        if repair:
            assert isinstance(result.kv_repaired_at, int), result
        else:
            assert result.kv_repaired_at is None
