"""Early layer skipping (models.skip, issue 21): the engine's skip mask, cache consistency, routers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from models.cpu import prepare_cpu
from models.errors import InvalidRequest
from models.generate import Generator
from models.loaded import LoadedModel
from models.quant import quantize_model
from models.runtime import load
from models.sampling import SamplingParams
from models.skip import (
    MAX_RATIO,
    RouterMismatch,
    Routers,
    RouterSet,
    RouterSpec,
    prefill,
    routers_dir,
    skip_count,
)
from models.skip_train import SkipTraining, train
from models.transformer import Step, Transformer
from tests.tiny import TinySpec, write_tiny_gguf


def _decode(model: Transformer, ids: torch.Tensor, prompt: int, skip: frozenset[int], fast: bool) -> torch.Tensor:
    """Prefill ids[:, :prompt] at full depth, then feed the rest one token at a time with `skip`:
    (T - prompt + 1, V) logits (the prefill's last, then each step's)."""
    model.fast_decode = fast
    model.setup_cache(1, ids.shape[1] + 1)
    out = [model(ids[:, :prompt], Step.at(0, prompt))[0, -1]]
    for t in range(prompt, ids.shape[1]):
        h = model.forward_layers(model.embed(ids[:, t : t + 1]), Step.at(t, 1), skip=skip)
        out.append(model.head(h)[0, -1])
    return torch.stack(out)


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny llama of six layers: routers have four unprotected layers to choose from."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("skip") / "six.gguf", TinySpec(arch="llama", n_layers=6))
    return load(path, use_cache=False)


@torch.no_grad()
def test_an_empty_skip_set_is_the_base_model_exactly(tiny: LoadedModel) -> None:
    model = prepare_cpu(quantize_model(copy.deepcopy(tiny.model), 4))
    ids = torch.randint(0, tiny.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    plain = []
    model.setup_cache(1, 21)
    plain.append(model(ids[:, :8], Step.at(0, 8))[0, -1])
    for t in range(8, 20):
        plain.append(model(ids[:, t : t + 1], Step.at(t, 1))[0, -1])
    assert torch.equal(_decode(model, ids, 8, frozenset(), fast=True), torch.stack(plain))


@torch.no_grad()
def test_the_kernels_skip_the_layers_torch_skips(tiny: LoadedModel) -> None:
    """The C decode path takes the mask: its logits equal torch's with the same layers skipped,
    and differ from the unskipped model's; a skipped layer never writes its cache in decode."""
    model = prepare_cpu(quantize_model(copy.deepcopy(tiny.model), 4))
    n = tiny.config.n_layers
    skip = frozenset({n - 1}) if n == 2 else frozenset({1, 3, 4})
    ids = torch.randint(0, tiny.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    slow = _decode(model, ids, 10, skip, fast=False)
    fast = _decode(model, ids, 10, skip, fast=True)
    assert model.decoder is not None and model.decoder.built, "the kernels did not run"
    torch.testing.assert_close(fast, slow, atol=5e-4 * float(slow.abs().max()), rtol=1e-3)
    for i in range(n):  # the prompt's slots written by prefill; the decode's only where a layer ran
        cache = model.caches[i]
        assert cache is not None and cache.k[0, :, :10].abs().sum() > 0
        decoded = cache.k[0, :, 10:24].abs().sum() + cache.v[0, :, 10:24].abs().sum()
        assert (decoded == 0) == (i in skip), i
    base = _decode(model, ids, 10, frozenset(), fast=True)
    assert not torch.allclose(base[1:], fast[1:], atol=1e-3)
    torch.testing.assert_close(base[0], fast[0])  # the prefill's logits: full depth either way


@torch.no_grad()
def test_the_cache_stays_consistent_over_a_1024_token_decode(tmp_path: Path) -> None:
    """1,024 tokens decoded one at a time by the kernels with a skip set give the logits that
    the same tokens teacher-forced in one chunk through torch's ops with that set give."""
    path = write_tiny_gguf(tmp_path / "long.gguf", TinySpec(arch="llama", n_layers=4, context_length=1200))
    model = prepare_cpu(quantize_model(load(path, use_cache=False).model, 4))
    skip = frozenset({1, 2})
    ids = torch.randint(0, model.cfg.vocab_size, (1, 1040), generator=torch.Generator().manual_seed(3))
    stepped = _decode(model, ids, 16, skip, fast=True)[1:]  # (1024, V)
    model.setup_cache(1, 1041)
    model.forward_layers(model.embed(ids[:, :16]), Step.at(0, 16))
    chunk = model.head(model.forward_layers(model.embed(ids[:, 16:]), Step.at(16, 1024), skip=skip))[0]
    torch.testing.assert_close(stepped, chunk, atol=2e-3 * float(chunk.abs().max()), rtol=1e-3)
    assert torch.equal(stepped[-64:].argmax(-1), chunk[-64:].argmax(-1))


def test_skip_sets_and_ratios_out_of_range_are_clear_errors(tiny: LoadedModel) -> None:
    model = tiny.model
    model.setup_cache(1, 4)
    h = model.embed(torch.tensor([[1]]))
    with pytest.raises(ValueError, match="skip names layers outside"):
        model.forward_layers(h, Step.at(0, 1), skip=frozenset({model.cfg.n_layers}))
    with pytest.raises(InvalidRequest, match=r"skip ratio must be in \[0, 0.75\]"):
        skip_count(30, MAX_RATIO + 0.01)
    with pytest.raises(InvalidRequest, match="skip ratio"):
        skip_count(30, float("nan"))
    with pytest.raises(InvalidRequest, match="asks for 3 of the 2 layers"):
        skip_count(4, 0.75, protected=2)
    assert skip_count(30, 0.2, 2) == 6


def _windows(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def test_router_training_is_deterministic_for_a_seed(six: LoadedModel) -> None:
    spec = RouterSpec("six", "fp32", 6, six.config.dim)
    config = SkipTraining(seed=7, ratio=0.5, prompt_tokens=12, continuation_tokens=6, epochs=2, batch=4)
    windows = _windows(six.config.vocab_size, 8, 18, 0)
    a, b = train(six.model, spec, windows, config), train(six.model, spec, windows, config)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.weight.abs().sum() > 0, "training did not move the routers"
    c = train(six.model, spec, windows, SkipTraining(**{**config.__dict__, "seed": 8}))
    assert not torch.equal(a.weight, c.weight)
    # The penalty is the push towards skipping: without it the KL alone lifts the keep gates.
    free = train(six.model, spec, windows, SkipTraining(**{**config.__dict__, "penalty": 0.0}))
    assert a.training["final_keep"] < free.training["final_keep"]


@torch.no_grad()
def test_routers_choose_per_prompt_and_never_a_protected_layer(six: LoadedModel) -> None:
    spec = RouterSpec("six", "fp32", 6, six.config.dim)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(6, six.config.dim, generator=g)
    routers = Routers(spec, weight, torch.zeros(6), frozenset({0, 5}), (3, 1, 2, 4))
    chosen = set()
    for seed in range(12):
        ids = torch.tensor(_windows(six.config.vocab_size, 1, 10, seed))
        six.model.setup_cache(1, 10)
        _, pooled = prefill(six.model, six.model.embed(ids), Step.at(0, 10))
        assert pooled.shape == (1, 6, six.config.dim)
        skip = routers.choose(pooled[0], 0.34)  # round(0.34 * 6) = 2 layers
        assert len(skip) == 2 and not skip & routers.protected
        lowest = torch.argsort(routers.scores(pooled[0])).tolist()
        assert skip == frozenset([i for i in lowest if i not in routers.protected][:2])
        chosen.add(skip)
    assert len(chosen) > 1, "every prompt got the same layers: nothing per request"
    assert routers.static(0.34) == frozenset({3, 1})


def test_routers_for_another_model_are_refused_at_load(tmp_path: Path, six: LoadedModel) -> None:
    spec = RouterSpec("smollm2-135m-instruct", "source", 30, 576)
    routers = Routers(spec, torch.zeros(30, 576), torch.ones(30), frozenset({0, 29}), tuple(range(1, 29)))
    routers.save(tmp_path / "r")
    again = Routers.load(tmp_path / "r", spec)
    assert torch.equal(again.bias, routers.bias) and again.static_order == routers.static_order
    for other, named in (
        (RouterSpec("smollm2-135m-instruct", "int4", 30, 576), "quant 'source' (not 'int4')"),
        (RouterSpec("gemma3-270m", "source", 18, 640), "model 'smollm2-135m-instruct' (not 'gemma3-270m')"),
        (RouterSpec("smollm2-135m-instruct", "source", 24, 576), "n_layers 30 (not 24)"),
    ):
        with pytest.raises(RouterMismatch, match=named.replace("(", r"\(").replace(")", r"\)")):
            Routers.load(tmp_path / "r", other)
    meta = json.loads((tmp_path / "r" / "routers.json").read_text())
    (tmp_path / "r" / "routers.json").write_text(json.dumps(meta)[:40])
    with pytest.raises(InvalidRequest, match="not readable routers"):
        Routers.load(tmp_path / "r", spec)


def _router_set(
    model: Transformer, name: str, quant: str, ratio: float = 0.34, protected: frozenset[int] = frozenset({0, 5})
) -> RouterSet:
    L, D = model.cfg.n_layers, model.cfg.dim
    weight = torch.randn(L, D, generator=torch.Generator().manual_seed(9))
    routers = Routers(RouterSpec(name, quant, L, D), weight, torch.zeros(L), protected, (1, 2, 3, 4), {"ratio": ratio})
    return RouterSet({ratio: routers})


def test_a_request_skips_the_layers_its_routers_choose(six: LoadedModel) -> None:
    """Generator: a skip_ratio request decodes with the routed set (the same tokens as decoding by
    hand with that set) and reports it on its last event; lossless greedy is the base's output."""
    gen = Generator(six.model, six.tokenizer, _router_set(six.model, "six", six.served_quant))
    ids = [5, 17, 40, 99, 3, 250, 7, 11]
    events = list(gen.stream([ids], SamplingParams(max_tokens=12, ignore_eos=True, skip_ratio=0.34)))
    report = events[-1].skipping
    assert report is not None and len(report.layers) == 2 and not {0, 5} & set(report.layers)
    assert all(ev.skipping is None for ev in events[:-1])
    model = six.model
    model.setup_cache(1, 21)
    h = model.forward_layers(model.embed(torch.tensor([ids])), Step.at(0, 8))
    want = [int(model.head(h[0, -1]).argmax())]
    for t in range(11):
        h = model.forward_layers(
            model.embed(torch.tensor([[want[-1]]])), Step.at(8 + t, 1), skip=frozenset(report.layers)
        )
        want.append(int(model.head(h[0, -1]).argmax()))
    assert [ev.token_id for ev in events] == want
    plain = [ev.token_id for ev in gen.stream([ids], SamplingParams(max_tokens=12, ignore_eos=True))]
    lossless = list(gen.stream([ids], SamplingParams(max_tokens=12, ignore_eos=True, skip_ratio=0.34, lossless=True)))
    assert [ev.token_id for ev in lossless] == plain
    done = lossless[-1].skipping
    assert done is not None and done.lossless and done.layers == report.layers and done.drafted >= done.accepted


def test_skipping_requests_that_cannot_run_are_clear_errors(six: LoadedModel) -> None:
    with pytest.raises(InvalidRequest, match="skip_ratio must be in"):
        SamplingParams(skip_ratio=0.8)
    with pytest.raises(InvalidRequest, match="set skip_ratio > 0 with it"):
        SamplingParams(lossless=True)
    bare = Generator(six.model, six.tokenizer)
    with pytest.raises(InvalidRequest, match="no layer-skipping routers"):
        list(bare.stream(["the cat"], SamplingParams(skip_ratio=0.2)))
    gen = Generator(six.model, six.tokenizer, _router_set(six.model, "six", six.served_quant))
    with pytest.raises(InvalidRequest, match="one prompt and one choice"):
        list(gen.stream(["the cat"], SamplingParams(skip_ratio=0.2, n=2, temperature=1.0)))
    with pytest.raises(InvalidRequest, match="no logprobs or grammar"):
        list(gen.stream(["the cat"], SamplingParams(skip_ratio=0.2, lossless=True, logprobs=2)))
    narrow = Generator(six.model, six.tokenizer, _router_set(six.model, "six", "q", protected=frozenset({0, 1, 4, 5})))
    with pytest.raises(InvalidRequest, match="asks for 3 of the 2 layers that may be skipped"):
        list(narrow.stream(["the cat"], SamplingParams(skip_ratio=0.5)))


def test_the_agent_refuses_routers_trained_for_another_precision(
    six: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    assert "no layer skipping" in six.attach_routers("six") and six.routers is None
    _router_set(six.model, "six", "int8").save(routers_dir("six", six.served_quant))
    with pytest.raises(RouterMismatch, match="quant 'int8'"):
        six.attach_routers("six")
    _router_set(six.model, "six", six.served_quant).save(routers_dir("six", six.served_quant))
    assert six.attach_routers("six") == "layer skipping at ratios 0.34" and six.routers is not None
    six.routers = None


def test_a_router_set_keeps_routers_only_where_they_beat_static_skipping(six: LoadedModel) -> None:
    """...and records each ratio's measured top-1 agreement on the held-out windows, which its
    variants() report (what an agent advertises for the hub's quality_floor)."""
    from models.skip import SkipVariant
    from models.skip_train import agreement, mean_kl, train_set

    spec = RouterSpec("six", six.served_quant, 6, six.config.dim)
    config = SkipTraining(prompt_tokens=12, continuation_tokens=6, epochs=1, batch=4)
    windows = _windows(six.config.vocab_size, 16, 18, 1)
    routers = train_set(six.model, spec, windows, [0.34, 0.5], config, order_windows=4, select_windows=8)
    assert sorted(routers.by_ratio) == [0.34, 0.5]
    held = windows[-8:]
    for ratio, r in routers.by_ratio.items():
        record = r.training
        assert record["selected"] in ("routers", "static") and record["ratio"] == ratio
        assert (record["selected"] == "routers") == (record["held_out_kl"] < record["static_kl"])
        kept = mean_kl(six.model, held, 12, lambda p, r=r, q=ratio: r.choose(p, q))
        assert kept == pytest.approx(min(record["held_out_kl"], record["static_kl"]), rel=1e-4)
        if record["selected"] == "static":  # static skipping itself: the same set for every prompt
            assert not r.weight.any()
        measured = agreement(six.model, held, 12, lambda p, r=r, q=ratio: r.choose(p, q))
        assert record["agreement"] == pytest.approx(measured) and 0.0 <= measured <= 1.0
    assert agreement(six.model, held, 12, lambda p: frozenset()) == 1.0  # nothing skipped: the model itself
    agreements = [routers.by_ratio[r].training["agreement"] for r in (0.34, 0.5)]
    assert routers.variants() == [SkipVariant(0.34, 2, agreements[0]), SkipVariant(0.5, 3, agreements[1])]


@pytest.mark.slow  # trains on the real model: about two minutes on two cores
def test_train_routers_saves_what_an_agent_then_attaches() -> None:
    import shutil
    import subprocess
    import sys

    from tests.conftest import real_model

    served = real_model("smollm2-135m-instruct", "source")
    directory = routers_dir("smollm2-135m-instruct", served.served_quant)
    if directory.exists():
        pytest.skip(f"{directory} holds routers already; not overwriting them")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tandem_cli", "models", "train-routers", "smollm2-135m-instruct", "--ratios", "0.1",
             "--windows", "40", "--epochs", "1", "--eval-windows", "2"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "skip 0.1 (3 layers)" in done.stdout and f"routers: {directory}" in done.stdout
        loaded = copy.copy(served)
        assert loaded.attach_routers("smollm2-135m-instruct") == "layer skipping at ratios 0.1"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_bundle_carries_its_routers_and_refuses_them_for_another_model(six: LoadedModel, tmp_path: Path) -> None:
    import hashlib

    from models.bundle import BundleError, load_bundle, save_bundle

    loaded = copy.copy(six)
    loaded.routers = _router_set(six.model, "six", six.served_quant)
    save_bundle(loaded, tmp_path / "b", "six")
    back = load_bundle(tmp_path / "b", prepare=False)
    assert back.routers is not None and back.skip_ratios == [0.34]
    assert back.attach_routers("six") == "layer skipping at ratios 0.34 (its bundle's)"  # what an agent keeps
    assert torch.equal(back.routers.for_ratio(0.34).weight, loaded.routers.for_ratio(0.34).weight)

    meta_path = tmp_path / "b" / "routers" / "r0.34" / "routers.json"
    meta = json.loads(meta_path.read_text())
    meta["spec"]["quant"] = "int4"  # trained for another precision, checksum made to match
    meta_path.write_text(json.dumps(meta))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["routers"]["sha256"]["routers/r0.34/routers.json"] = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"routers do not fit its model: .*quant 'int4'"):
        load_bundle(tmp_path / "b", prepare=False)
    meta_path.write_text(meta_path.read_text() + " ")  # and now not what the manifest says
    with pytest.raises(BundleError, match=r"routers/r0\.34/routers\.json is missing or does not match"):
        load_bundle(tmp_path / "b", prepare=False)


def test_a_ratio_that_crossed_the_wire_as_float32_skips_what_was_trained() -> None:
    """0.1 sent as float32 (0.10000000149) must not round 25 layers up to 3 skipped: it stands for
    the trained 0.1 (2 layers); a ratio far from every trained one keeps its own count."""
    import struct

    from models.skip import Routers, RouterSet, RouterSpec

    spec = RouterSpec("m", "int4", 25, 8)
    routers = Routers(spec, torch.zeros(25, 8), torch.arange(25, dtype=torch.float32), frozenset({0, 24}))
    rs = RouterSet({0.1: routers})
    wire = struct.unpack("f", struct.pack("f", 0.1))[0]
    assert wire != 0.1 and round(wire * 25) == 3 and rs.snapped(wire) == 0.1
    assert len(rs.choose(torch.zeros(25, 8), wire)) == 2
    assert rs.snapped(0.3) == 0.3 and len(rs.choose(torch.zeros(25, 8), 0.3)) == round(0.3 * 25)
