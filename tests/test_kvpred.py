"""KV prediction (models.kvpred) against the whole model: exact with identity predictors, keys and
values at the right layers and slots (Gemma's local and global RoPE included), deterministic
fitting, a repair that ends in the whole model's cache, and clear refusals."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from models import kvpred, kvpred_train
from models.errors import InvalidRequest
from models.generate import Generator
from models.loaded import LoadedModel
from models.runtime import load
from models.sampling import SamplingParams
from models.transformer import Step, Transformer, apply_rope
from tests.conftest import real_model


def ids_of(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def whole(model: Transformer, ids: list[int], extra: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The whole model on ids: the first T-1 in one prefill, the last alone (what KV prediction's
    first token is computed as): its logits (1, 1, V) and every layer's key cache."""
    tok = torch.tensor([ids])
    T = len(ids)
    model.setup_cache(1, T + extra)
    model.forward_layers(model.embed(tok[:, :-1]), Step.at(0, T - 1))
    logits = model.head(model.forward_layers(model.embed(tok[:, -1:]), Step.at(T - 1, 1)))
    return logits, [c.k.clone() for c in model.caches if c is not None]


def spec_of(loaded: LoadedModel, name: str = "tiny") -> kvpred.PredictorSpec:
    return kvpred.PredictorSpec.of(loaded.model, name, loaded.served_quant)


def as_depth(p: kvpred.KVPredictor, depth: float) -> kvpred.PredictorSet:
    return kvpred.PredictorSet({depth: dataclasses.replace(p, depth=depth)})


def test_identity_predictors_over_the_whole_model_give_its_output_exactly(tiny: LoadedModel) -> None:
    """An auxiliary model that is the base and identity predictors: every cache slot and the first
    token's logits bit for bit the whole model's (40 tokens: past Gemma's sliding window of 8)."""
    model = tiny.model
    ids = ids_of(40, model.cfg.vocab_size)
    ref_logits, ref_keys = whole(model, ids)
    model.setup_cache(1, len(ids))
    h, predicted = kvpred.predict_prompt(model, kvpred.identity(spec_of(tiny)), torch.tensor([ids]))
    assert predicted == len(ids) - 1
    assert torch.equal(model.head(h), ref_logits)
    assert all(torch.equal(c.k, k) for c, k in zip(model.caches, ref_keys, strict=True))
    # Every layer is exact here, so nothing was rewritten; write_kv itself must also reproduce the
    # forward pass's cache bit for bit (RoPE by the same kernel, at the same slots).
    assert kvpred.identity(spec_of(tiny)).exact == frozenset(range(model.cfg.n_layers))
    model.setup_cache(1, len(ids))
    _, captured = kvpred.captured_pass(model, torch.tensor([ids[:-1]]), range(model.cfg.n_layers))
    for c in model.caches:
        c.k.zero_()
        c.v.zero_()
    kvpred.write_kv(model, [captured[i] for i in range(model.cfg.n_layers)], 0)
    assert all(
        torch.equal(c.k[:, :, :-1], k[:, :, : len(ids) - 1]) for c, k in zip(model.caches, ref_keys, strict=True)
    )


def test_identity_predictors_on_the_served_engine_keep_the_greedy_answer() -> None:
    """SmolLM2 as agents serve it (int4 on the kernels, the first token by one kernel step): the
    Generator with identity predictors answers as without them."""
    loaded = real_model("smollm2-135m-instruct", "source")
    model = loaded.model
    assert model.decoder is not None
    prompt = "The tutorial introduces the reader informally to the basic concepts of the Python language"
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    plain = [ev.token_id for ev in Generator(model, loaded.tokenizer).stream([prompt], params)]
    predictors = as_depth(kvpred.identity(spec_of(loaded, "smollm2")), 0.5)
    gen = Generator(model, loaded.tokenizer, predictors=predictors)
    events = list(gen.stream([prompt], dataclasses.replace(params, kv_prediction=0.5)))
    assert [ev.token_id for ev in events] == plain
    report = events[-1].kv
    assert report is not None and report.depth == 0.5
    assert report.predicted == len(loaded.tokenizer.encode(prompt)) - 1 and report.repaired_at is None


def test_predicted_keys_and_values_land_at_their_layers_and_slots(tiny: LoadedModel) -> None:
    """Each layer fed another layer's keys and values (identity maps, sources rotated by one): its
    cache holds exactly those, its keys rotated with its own RoPE base (Gemma: local on sliding
    layers, global on the others) at every slot of the prompt, past the sliding window too."""
    model, cfg = tiny.model, tiny.model.cfg
    L, T = cfg.n_layers, 30
    ids = ids_of(T + 1, cfg.vocab_size, seed=1)
    spec = spec_of(tiny)
    model.setup_cache(1, T + 1)
    _, true = kvpred.captured_pass(model, torch.tensor([ids[:T]]), range(L))
    rotated = tuple(((layer + 1) % L,) for layer in range(L))
    p = dataclasses.replace(kvpred.identity(spec), sources=rotated)
    model.setup_cache(1, T + 1)
    kvpred.predict_prompt(model, p, torch.tensor([ids]))
    slots = torch.arange(T)
    bases = {cfg.rope_base, cfg.rope_local_base}
    assert L < 3 or len(bases) == 1 or len({model.layers[i].sliding for i in range(L)}) == 2
    for layer in range(L):
        k, v = true[(layer + 1) % L]  # (1, T, K, hd), keys before RoPE
        cos, sin = model.rope[cfg.rope_local_base if model.layers[layer].sliding else cfg.rope_base]
        want = apply_rope(k.transpose(1, 2), cos[slots][None, None], sin[slots][None, None])
        cache = model.caches[layer]
        torch.testing.assert_close(cache.k[:, :, :T], want.to(cache.k.dtype), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v[:, :, :T], v.transpose(1, 2).to(cache.v.dtype), rtol=0, atol=0)
        other = cfg.rope_base if model.layers[layer].sliding else cfg.rope_local_base
        if other != (cfg.rope_local_base if model.layers[layer].sliding else cfg.rope_base):
            cos_o, sin_o = model.rope[other]
            wrong = apply_rope(k.transpose(1, 2), cos_o[slots][None, None], sin_o[slots][None, None])
            assert not torch.allclose(cache.k[:, :, :T], wrong.to(cache.k.dtype), atol=1e-3)


def windows_of(model: Transformer, n: int, length: int) -> list[list[int]]:
    return [ids_of(length, model.cfg.vocab_size, seed=10 + i) for i in range(n)]


def test_fitting_is_deterministic_and_fits(tiny: LoadedModel) -> None:
    """The same windows give bit-identical predictors, the manifest's data hash names them, and the
    fit predicts the true keys and values better than their mean does (R^2 > 0 on training data)."""
    model, L = tiny.model, tiny.model.cfg.n_layers
    windows = windows_of(model, 4, 48)
    aux = {0.5: kvpred.aux_layers_for([float(i % 3) for i in range(L)], 0.5)}
    config = kvpred_train.KVTraining(batch=2)
    a = kvpred_train.fit(model, spec_of(tiny), windows, aux, config)[0.5]
    b = kvpred_train.fit(model, spec_of(tiny), windows, aux, config)[0.5]
    assert all(torch.equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))
    assert kvpred_train.data_sha256(windows) == kvpred_train.data_sha256([list(w) for w in windows])
    assert kvpred_train.data_sha256(windows) != kvpred_train.data_sha256(windows[::-1])
    model.setup_cache(1, 48)
    tok = torch.tensor([windows[0]])
    _, true = kvpred.captured_pass(model, tok, range(L))
    _, got = kvpred.captured_pass(model, tok, a.aux_layers, skip=a.dropped)
    for (pk, pv), layer in zip(a.predict(got), range(L), strict=True):
        for pred, target in ((pk, true[layer][0]), (pv, true[layer][1])):
            resid = (pred - target).pow(2).sum()
            spread = (target - target.mean((0, 1), keepdim=True)).pow(2).sum()
            assert resid < spread, f"layer {layer}: no better than the mean"


def test_repair_ends_in_the_whole_models_cache_and_answer(tiny: LoadedModel) -> None:
    """Deliberately poor predictors (zeros), then repair in pieces of 32 slots: after the second
    decode step the cache is the whole model's, and every token from then on is what the whole
    model generates after the same text."""
    model = tiny.model
    spec = spec_of(tiny)
    zero = dataclasses.replace(
        kvpred.identity(spec), weights=tuple(torch.zeros_like(w) for w in kvpred.identity(spec).weights)
    )
    gen = Generator(model, tiny.tokenizer, predictors=as_depth(zero, 0.25))
    prompt = ids_of(40, model.cfg.vocab_size, seed=2)
    params = SamplingParams(max_tokens=20, ignore_eos=True, kv_prediction=0.25, kv_repair=True)
    events = list(gen.stream([prompt], params))
    repaired = [c.k[:, :, :40].clone() for c in model.caches]
    report = events[-1].kv
    assert report is not None and report.predicted == 39
    assert report.repaired_at == 2  # slots [0, 32) before the 2nd token's step, [32, 41) before the 3rd's
    tokens = [ev.token_id for ev in events]
    plain = SamplingParams(max_tokens=18, ignore_eos=True)
    after = [ev.token_id for ev in Generator(model, tiny.tokenizer).stream([prompt + tokens[:2]], plain)]
    assert tokens[2:] == after
    _, true = whole(model, prompt)
    for k, t in zip(repaired, true, strict=True):
        torch.testing.assert_close(k, t[:, :, :40], rtol=1e-4, atol=1e-4)
    list(gen.stream([prompt], dataclasses.replace(params, kv_repair=False)))
    assert not all(
        torch.allclose(c.k[:, :, :39], t[:, :, :39], atol=1e-2) for c, t in zip(model.caches, true, strict=True)
    )


def test_a_short_prompt_prefills_on_the_whole_model(tiny: LoadedModel) -> None:
    model = tiny.model
    gen = Generator(model, tiny.tokenizer, predictors=as_depth(kvpred.identity(spec_of(tiny)), 0.25))
    prompt = ids_of(kvpred.MIN_PROMPT - 1, model.cfg.vocab_size)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    events = list(gen.stream([prompt], dataclasses.replace(params, kv_prediction=0.25, kv_repair=True)))
    assert events[-1].kv == kvpred.KVReport(0.25, 0, None)
    assert [ev.token_id for ev in events] == [ev.token_id for ev in gen.stream([prompt], params)]


def test_predictors_for_another_model_precision_or_shape_are_refused(tmp_path: Path) -> None:
    spec = kvpred.PredictorSpec("smollm2-135m-instruct", "int4", 3, 2, 8)
    kvpred.PredictorSet({0.5: dataclasses.replace(kvpred.identity(spec), depth=0.5)}).save(tmp_path)
    assert kvpred.PredictorSet.load(tmp_path, spec).depths == [0.5]
    for field, value, named in (
        ("quant", "int8", "quant 'int4' (not 'int8')"),
        ("model", "gemma3-270m", "model 'smollm2-135m-instruct' (not 'gemma3-270m')"),
        ("n_layers", 4, "n_layers 3 (not 4)"),
        ("head_dim", 16, "head_dim 8 (not 16)"),
    ):
        with pytest.raises(kvpred.KVMismatch, match=re.escape(named)):
            kvpred.PredictorSet.load(tmp_path, dataclasses.replace(spec, **{field: value}))
    (tmp_path / "d0.5" / "predictors.pt").write_bytes(b"not torch")
    with pytest.raises(InvalidRequest, match="not readable KV predictors"):
        kvpred.PredictorSet.load(tmp_path, spec)
    with pytest.raises(InvalidRequest, match="no KV predictors"):
        kvpred.PredictorSet.load(tmp_path / "empty", spec)


def test_requests_the_model_cannot_predict_are_clear_errors(tiny: LoadedModel) -> None:
    model = tiny.model
    prompt = ids_of(20, model.cfg.vocab_size)
    ask = SamplingParams(max_tokens=2, kv_prediction=0.25)
    with pytest.raises(InvalidRequest, match=r"no KV predictors .*tandem models train-kv.*kv_prediction 0"):
        list(Generator(model, tiny.tokenizer).stream([prompt], ask))
    gen = Generator(model, tiny.tokenizer, predictors=as_depth(kvpred.identity(spec_of(tiny)), 0.5))
    with pytest.raises(InvalidRequest, match=r"no KV predictors at depth 0\.25 .*trained: 0\.5"):
        list(gen.stream([prompt], ask))
    at_half = dataclasses.replace(ask, kv_prediction=0.5)
    with pytest.raises(InvalidRequest, match="n = 1"):
        list(gen.stream([prompt], dataclasses.replace(at_half, n=2)))
    with pytest.raises(InvalidRequest, match="n = 1"):
        list(gen.stream([prompt, prompt], at_half))
    with pytest.raises(InvalidRequest, match="prompt logprobs"):
        list(gen.stream([prompt], dataclasses.replace(at_half, prompt_logprobs=1)))
    for bad, named in (
        ({"kv_prediction": 0.3}, "kv_prediction must be 0 or an auxiliary depth"),
        ({"kv_repair": True}, "kv_repair repairs a predicted cache"),
        ({"kv_prediction": 0.5, "skip_ratio": 0.2}, "one at a time"),
    ):
        with pytest.raises(InvalidRequest, match=named):
            SamplingParams(**bad)


def test_a_loaded_model_finds_the_predictors_trained_for_it(
    tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """attach_predictors reads kv_dir(name, precision served); another precision's are not found."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    loaded = load(tiny_path, use_cache=False)
    assert "no KV prediction" in loaded.attach_predictors("tiny") and loaded.kv_variants == []
    p = dataclasses.replace(kvpred.identity(spec_of(loaded)), depth=0.5, record={"quality": {"agreement": 0.9}})
    kvpred.PredictorSet({0.5: p}).save(kvpred.kv_dir("tiny", loaded.served_quant))
    assert loaded.attach_predictors("tiny") == "KV prediction at depths 0.5"
    assert [v.depth for v in loaded.kv_variants] == [0.5] and loaded.kv_variants[0].agreement == 0.9
    assert loaded.generator().predictors is loaded.predictors
    other = load(tiny_path, use_cache=False)
    other.quant = "int8-other"
    assert "no KV prediction" in other.attach_predictors("tiny")


@pytest.mark.parametrize("layout", ["influence", "prefix"])
def test_finetuning_is_deterministic_and_lowers_its_loss(tiny: LoadedModel, layout: str) -> None:
    """End-to-end fine-tuning from least squares: the same seed gives bit-identical predictors, and
    on the windows it trained on the whole model's continuation moves towards the true cache's (the
    KL to it falls). With the prefix layout (Gemma's 7 layers: 3 exact) the exact layers stay exact."""
    model, L = tiny.model, tiny.model.cfg.n_layers
    windows = windows_of(model, 3, 40)
    layers = kvpred_train.layouts_for([float(i % 3) for i in range(L)], 0.5, [layout])[layout]
    config = kvpred_train.KVTraining(finetune_epochs=4, lr=3e-3, seed=5)
    start = kvpred_train.fit(model, spec_of(tiny), windows, {0.5: layers}, config)[0.5]
    exact = start.exact
    assert layout == "influence" or L < 4 or exact  # the prefix layout keeps its first layers exact
    weights = tuple(w if i in exact else w * 0.5 for i, w in enumerate(start.weights))  # room to improve
    start = dataclasses.replace(start, weights=weights)
    a = kvpred_train.finetune(model, start, windows, 24, config)
    b = kvpred_train.finetune(model, start, windows, 24, config)
    assert all(torch.equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.weights, start.weights, strict=True))
    assert a.exact == exact

    def kl(p: kvpred.KVPredictor) -> float:
        total = 0.0
        for w in windows:
            base = torch.log_softmax(kvpred_train.continuation_logits(model, w, 24, None).float(), -1)
            pred = torch.log_softmax(kvpred_train.continuation_logits(model, w, 24, p).float(), -1)
            total += float(torch.nn.functional.kl_div(pred, base, log_target=True, reduction="batchmean"))
        return total

    assert kl(a) < kl(start)


def test_a_prompt_whose_last_piece_is_one_token_is_predicted_whole() -> None:
    """258 tokens: the aux pass over 257 runs in pieces of 256 and 1, and a one-token piece would
    take the kernels' route, which captures nothing. Every slot still gets its source layer's keys
    and values (sources rotated by one, so a slot left to the aux pass would hold its own)."""
    from models.transformer import PREFILL_CHUNK

    loaded = real_model("smollm2-135m-instruct", "source")
    model, L = loaded.model, loaded.model.cfg.n_layers
    assert model.decoder is not None
    ids = ids_of(PREFILL_CHUNK + 2, model.cfg.vocab_size, seed=4)
    T = len(ids)
    model.setup_cache(1, T)
    _, true = kvpred.captured_pass(model, torch.tensor([ids[: T - 1]]), range(L))
    rotated = tuple(((layer + 1) % L,) for layer in range(L))
    p = dataclasses.replace(kvpred.identity(spec_of(loaded, "smollm2")), sources=rotated)
    model.setup_cache(1, T)
    _, predicted = kvpred.predict_prompt(model, p, torch.tensor([ids]))
    assert predicted == T - 1 and model.fast_decode
    for layer in range(L):
        v = true[(layer + 1) % L][1][0].transpose(0, 1)  # (K, T-1, hd)
        torch.testing.assert_close(model.caches[layer].v[0, :, : T - 1], v.to(model.caches[layer].v.dtype))


def test_training_keeps_the_layout_that_predicts_best_on_held_out_windows(tiny: LoadedModel) -> None:
    """train_set fits every layout of auxiliary layers at each depth, keeps the one with the lowest
    held-out bits (recording every layout's), and saves what the hub weighs."""
    model, L = tiny.model, tiny.model.cfg.n_layers
    config = kvpred_train.KVTraining(
        depths=(0.5,), windows=4, held_out=2, window_tokens=40, continuation_tokens=16, influence_windows=2, batch=2
    )
    windows = windows_of(model, 6, 40)
    ps = kvpred_train.train_set(model, spec_of(tiny), windows, config)
    p = ps.for_depth(0.5)
    layouts = p.record["layouts"]
    assert p.record["layout"] in layouts and set(layouts) <= {"prefix", "influence"}
    assert layouts[p.record["layout"]]["bpb_ratio"] == min(v["bpb_ratio"] for v in layouts.values())
    if p.record["layout"] == "prefix":
        assert p.aux_layers == kvpred.prefix_layers(L, 0.5)
    variant = ps.variants()[0]
    assert variant.depth == 0.5 and variant.aux_layers == p.aux_layers and 0 <= variant.agreement <= 1
    assert variant.bpb_ratio == p.record["quality"]["bpb_ratio"] and variant.prefill_share > 0
    assert p.record["data_sha256"] == kvpred_train.data_sha256(windows[:4])
    assert kvpred.prefix_layers(30, 0.5) == (*range(14), 29) and kvpred.prefix_layers(4, 0.1) == (3,)
    first = min(p.dropped)
    assert p.exact == frozenset(range(first))  # below the first dropped layer: its own keys, unpredicted
    fake = torch.zeros(1, 2, model.cfg.n_kv_heads, model.cfg.head_dim)
    predicted = p.predict(dict.fromkeys(p.aux_layers, (fake, fake)))
    assert all(pair is None for pair in predicted[:first]) and all(pair is not None for pair in predicted[first:])
