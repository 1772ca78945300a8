"""Layer skipping end to end: the Sampling options and the skip report through the wire, the SDK,
the hub's placement, an agent, the hub's own model and the OpenAI-compatible API (tiny models)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from cloud_hub.errors import InvalidRequest as HubInvalidRequest
from cloud_hub.upstream import _check_supported
from models.loaded import LoadedModel
from models.runtime import load
from models.sampling import MAX_SKIP_RATIO, SamplingParams
from models.serving import ServedModel
from models.skip import Routers, RouterSet, RouterSpec, routers_dir
from tandem import AsyncClient, Client, GenerateResult, InvalidRequest
from tandem.client import MAX_SKIP_RATIO as SDK_MAX_SKIP_RATIO
from tandem.client import build_request
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import sampling_kwargs, sampling_message
from tests.hubkit import running_hub, start_served_agent
from tests.tiny import TinySpec, write_tiny_gguf

PROMPT = "the cat sat in a hat"
RATIO = 0.34
"""round(0.34 x 6) = 2 of the 4 layers the routers may skip (0 and 5 are protected)."""
PROTECTED = frozenset({0, 5})


@pytest.fixture
def six(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "six.gguf", TinySpec(arch="llama", n_layers=6))


def router_set(loaded: LoadedModel, name: str) -> RouterSet:
    """Random routers for `loaded` as served under `name` (trained ones only choose better)."""
    L, D = loaded.config.n_layers, loaded.config.dim
    spec = RouterSpec(name, loaded.served_quant, L, D)
    weight = torch.randn(L, D, generator=torch.Generator().manual_seed(3))
    routers = Routers(spec, weight, torch.zeros(L), PROTECTED, tuple(range(1, L - 1)), {"ratio": RATIO})
    return RouterSet({RATIO: routers})


def with_routers(path: Path, name: str) -> LoadedModel:
    loaded = load(path, use_cache=False)
    loaded.routers = router_set(loaded, name)
    return loaded


def assert_skipped(result: GenerateResult, lossless: bool) -> None:
    assert len(result.skipped_layers) == 2 and not PROTECTED & set(result.skipped_layers), result.skipped_layers
    assert result.lossless is lossless
    if lossless:
        assert result.drafted >= result.accepted and (result.drafted > 0 or result.completion_tokens == 1)
    else:
        assert result.drafted == result.accepted == 0


# -- the wire and the SDK, no hub ------------------------------------------------------------------


def test_sampling_carries_skip_ratio_and_lossless_both_ways() -> None:
    for ratio, lossless in ((0.0, False), (0.25, False), (0.5, True), (MAX_SKIP_RATIO, True)):
        params = SamplingParams(max_tokens=16, skip_ratio=ratio, lossless=lossless)
        wire = pb.Sampling.FromString(sampling_message(**vars(params)).SerializeToString())  # as the hub sends it
        assert SamplingParams(**sampling_kwargs(wire)) == params
    # a float on the wire: 0.34 comes back within float32's precision, and skips as many layers
    kw = sampling_kwargs(sampling_message(16, skip_ratio=RATIO, lossless=True))
    assert kw["skip_ratio"] == pytest.approx(RATIO) and round(kw["skip_ratio"] * 6) == 2 and kw["lossless"] is True
    assert (sampling_kwargs(pb.Sampling())["skip_ratio"], sampling_kwargs(pb.Sampling())["lossless"]) == (0.0, False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"skip_ratio": 0.9}, r"skip_ratio must be a number in \[0, 0.75\].*got 0.9"),
        ({"skip_ratio": -0.1}, r"skip_ratio must be a number in \[0, 0.75\].*got -0.1"),
        ({"skip_ratio": float("nan")}, r"skip_ratio must be .*got nan"),
        ({"skip_ratio": "0.3"}, r"skip_ratio must be a number"),
        ({"lossless": True}, r"lossless drafts with the layers skip_ratio skips: set skip_ratio > 0"),
    ],
)
def test_sdk_refuses_bad_skipping_options_before_sending(options: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as exc:
        build_request(PROMPT, **options)
    assert exc.value.code == "INVALID_ARGUMENT"
    with Client("127.0.0.1:1", timeout=1) as client, pytest.raises(InvalidRequest, match=message):  # no hub there
        client.generate(PROMPT, **options)


def test_sdk_limit_is_the_models_and_the_upstream_backend_refuses_skipping() -> None:
    assert SDK_MAX_SKIP_RATIO == MAX_SKIP_RATIO
    request = build_request(PROMPT, skip_ratio=0.25, lossless=True)
    assert (request.sampling.skip_ratio, request.sampling.lossless) == (0.25, True)
    with pytest.raises(HubInvalidRequest, match="skip_ratio: m is served by an upstream server here, without layer"):
        _check_supported(SamplingParams(max_tokens=4, skip_ratio=0.25), "m")


# -- a hub and agents -------------------------------------------------------------------------------


async def test_skipping_through_hub_and_agent(tmp_path: Path, six: Path) -> None:
    """Agent "six" has routers, agent "plain" (the same weights) has none: requests with a skip_ratio
    go only to "six", report what it skipped, and match the model run locally with the same routers."""
    async with running_hub(tmp_path / "hub", cloud_model=None, mqtt="none", http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("t")
        skipping = await start_served_agent(hub, ServedModel("six", with_routers(six, "six")), tmp_path / "a", "a")
        plain_model = ServedModel("plain", load(six, use_cache=False))
        plain_agent = await start_served_agent(hub, plain_model, tmp_path / "b", "b")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            advertised = {d.models[0].name: list(d.models[0].skip_ratios) for d in await client.devices()}
            assert advertised == {"six": [pytest.approx(RATIO)], "plain": []}

            skipped = await client.generate(PROMPT, model="six", max_tokens=12, skip_ratio=RATIO)
            assert skipped.placement is not None and skipped.placement.device_id == skipping.device_id
            assert_skipped(skipped, lossless=False)
            ref = with_routers(six, "six").generator()
            events = list(ref.stream([PROMPT], SamplingParams(max_tokens=12, skip_ratio=RATIO)))
            assert skipped.token_ids == [ev.token_id for ev in events]
            assert events[-1].skipping is not None and list(events[-1].skipping.layers) == skipped.skipped_layers

            whole = await client.generate(PROMPT, model="six", max_tokens=12)
            assert (whole.skipped_layers, whole.lossless, whole.drafted) == ([], False, 0)
            lossless = await client.generate(PROMPT, model="six", max_tokens=12, skip_ratio=RATIO, lossless=True)
            assert lossless.token_ids == whole.token_ids and lossless.text == whole.text  # greedy: the whole model's
            assert_skipped(lossless, lossless=True)

            anywhere = await client.generate(PROMPT, max_tokens=4, skip_ratio=RATIO)  # the hub picks: only "six"
            assert anywhere.placement is not None and anywhere.placement.device_id == skipping.device_id
            with pytest.raises(InvalidRequest, match="skip_ratio: no device serves layer skipping for model 'plain'"):
                await client.generate(PROMPT, model="plain", max_tokens=4, skip_ratio=RATIO)
            on_plain = f"layer skipping for any model on device '{plain_agent.device_id}'"
            with pytest.raises(InvalidRequest, match=on_plain):
                await client.generate(PROMPT, device=plain_agent.device_id, max_tokens=4, skip_ratio=RATIO)

        async with httpx.AsyncClient(base_url=f"http://{hub.http_address}", timeout=30) as http:
            headers = {"authorization": f"Bearer {key}"}
            chat = {"model": "six", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}

            async def post(tandem: dict) -> httpx.Response:
                return await http.post("/v1/chat/completions", json={**chat, "tandem": tandem}, headers=headers)

            answer = await post({"skip_ratio": RATIO, "lossless": True})
            assert answer.status_code == 200, answer.text
            info = answer.json()["tandem"]
            assert len(info["skipped_layers"]) == 2 and not PROTECTED & set(info["skipped_layers"])
            assert info["lossless"] is True and info["drafted"] >= info["accepted"]
            plain = (await post({})).json()["tandem"]
            report = [plain[k] for k in ("skipped_layers", "lossless", "drafted", "accepted")]
            assert report == [[], False, 0, 0]
            for tandem, named in (({"skip_ratio": 0.9}, "tandem.skip_ratio"), ({"lossless": True}, "lossless")):
                refused = await post(tandem)
                assert refused.status_code == 400 and named in refused.json()["error"]["message"], refused.text
        await skipping.close()
        await plain_agent.close()


async def test_skipping_on_the_hubs_own_model(tmp_path: Path, six: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub's local model finds the routers trained for it as an agent does (models.skip.routers_dir),
    and serves a skip_ratio itself; the report reaches the SDK."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    served = load(six, quant="source", use_cache=False)  # as the hub serves it: the routers' precision
    router_set(served, str(six)).save(routers_dir(str(six), served.served_quant))
    async with running_hub(tmp_path / "hub", cloud_model=str(six), mqtt="none") as hub:
        assert list(hub.service.placements.models()[0].skip_ratios) == [pytest.approx(RATIO)]
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            whole = await client.generate(PROMPT, max_tokens=10)
            skipped = await client.generate(PROMPT, max_tokens=10, skip_ratio=RATIO, device="cloud")
            lossless = await client.generate(PROMPT, max_tokens=10, skip_ratio=RATIO, lossless=True)
    assert skipped.placement is not None and skipped.placement.kind == "cloud"
    assert_skipped(skipped, lossless=False)
    assert_skipped(lossless, lossless=True)
    assert lossless.token_ids == whole.token_ids
