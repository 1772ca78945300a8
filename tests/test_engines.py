"""Bundles (save, verify, load) and the engine interface's conformance, on tiny models."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_agent.engines.base import EngineUnavailable
from edge_agent.engines.registry import make_engine
from edge_agent.engines.torch_engine import TorchEngine
from models.bundle import BundleError, load_bundle, save_bundle
from models.loaded import LoadedModel
from models.prune import prune_layers
from models.quant import quantize_model
from models.runtime import load
from models.sampling import SamplingParams
from models.transformer import Step


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.setup_cache(1, ids.shape[1])
    with torch.no_grad():
        return model(ids, Step.at(0, ids.shape[1]))


@pytest.fixture
def bundle(tiny: LoadedModel, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = copy.deepcopy(tiny.model)
    prune_layers(model, 1, list(range(tiny.config.n_layers)))  # drops layer 0: keeps original indices 1..
    quantize_model(model, 4)
    return save_bundle(LoadedModel(model, tiny.tokenizer, tiny.path), tmp_path / "b", "tiny"), model


def test_bundle_round_trip_is_exact(bundle: tuple[Path, torch.nn.Module], tiny: LoadedModel) -> None:
    path, model = bundle
    loaded = load(path)  # the runtime recognises a bundle directory
    assert [b.layer for b in loaded.model.layers] == [b.layer for b in model.layers]
    assert [b.sliding for b in loaded.model.layers] == [b.sliding for b in model.layers]
    ids = torch.randint(0, tiny.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(model, ids), atol=0, rtol=0)
    assert loaded.tokenizer.encode("the cat") == tiny.tokenizer.encode("the cat")


def test_loading_a_bundle_imports_no_symbolic_math(bundle: tuple[Path, torch.nn.Module]) -> None:
    """Building the model on the meta device must not pull in torch's Python meta kernels
    (sympy, mpmath): about 70 MB of the agent's RSS, for nothing a loaded bundle uses. Nor does
    the engine import the GGUF reader (gguf, yaml, sentencepiece: about 5 MB)."""
    path, _ = bundle
    code = (
        "import sys; from edge_agent.engines.torch_engine import TorchEngine; e = TorchEngine(); "
        f"e.load({str(path)!r}); m = e.loaded.model; "
        "print(sorted(k for k in ('sympy', 'mpmath', 'gguf') if k in sys.modules), m.tok_embeddings.linear.q.device)"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert done.stdout.split() == ["[]", "cpu"], done.stdout + done.stderr


def test_damaged_or_mismatched_bundles_are_refused(bundle: tuple[Path, torch.nn.Module]) -> None:
    path, _ = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    weights = (path / "weights.pt").read_bytes()
    (path / "weights.pt").write_bytes(weights[:-10] + b"0123456789")
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(path)
    (path / "weights.pt").write_bytes(weights)
    for key, value, message in [
        ("format", "other/9", "format"),
        ("quant", {"bits": 3, "group_size": 32}, "int8"),
        ("layers", list(range(20)), "disagree"),
        ("config", {"arch": "llama"}, "config"),
    ]:
        (path / "manifest.json").write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(BundleError, match=message):
            load_bundle(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(path).config.n_layers == len(manifest["layers"])


def test_engine_conformance_with_generation(tiny: LoadedModel, tiny_path: Path) -> None:
    engine = make_engine("torch")
    info = engine.load(str(tiny_path))
    assert info["n_layers"] == tiny.config.n_layers
    prompt = tiny.tokenizer.encode("the cat sat")
    want = tiny.generator().generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    got, logits = [], engine.prefill("a", prompt, len(prompt) + 8)
    other = engine.prefill("b", prompt[:2], 16)  # a second request in between keeps its own cache
    for _ in range(8):
        got.append(int(logits.argmax()))
        logits = engine.decode("a", got[-1])
        engine.decode("b", int(other.argmax()))
    assert got == want
    engine.release("a")
    with pytest.raises(KeyError, match="prefill it first"):
        engine.decode("a", 1)


def test_engine_runs_layer_ranges_like_the_whole_model(tiny: LoadedModel, tiny_path: Path) -> None:
    engine = make_engine("torch")
    engine.load(str(tiny_path))
    ids = torch.randint(0, tiny.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    want = _logits(tiny.model, ids)
    k = tiny.config.n_layers // 2
    h = engine.run_layers("s", tiny.model.embed(ids), 0, k, position=0)
    h = engine.run_layers("s", h, k, tiny.config.n_layers, position=0)
    torch.testing.assert_close(tiny.model.head(h), want, atol=1e-5, rtol=1e-5)


def test_unavailable_engines_fail_at_load_time() -> None:
    with pytest.raises(EngineUnavailable, match="unknown engine 'nosuch'"):
        make_engine("nosuch")
    if not torch.cuda.is_available():
        with pytest.raises(EngineUnavailable, match="no CUDA GPU"):
            make_engine("torch", "cuda")
    with pytest.raises(EngineUnavailable, match="cpu or cuda"):
        make_engine("torch", "tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device tool lends one to some tasks)")
def test_torch_engine_on_cuda_matches_cpu(tiny: LoadedModel, tiny_path: Path) -> None:
    cpu, gpu = make_engine("torch", "cpu"), make_engine("torch", "cuda")
    cpu.load(str(tiny_path))
    gpu.load(str(tiny_path))
    prompt = tiny.tokenizer.encode("the cat sat")
    torch.testing.assert_close(gpu.prefill("r", prompt, 16).cpu(), cpu.prefill("r", prompt, 16), atol=1e-3, rtol=1e-3)


def test_servers_advertise_what_their_weights_cost(tiny: LoadedModel) -> None:
    """An int4 bundle advertises its stored bytes, and the hub costs it at those bits a weight
    (decode reads ~5 bits a weight, not 32), so the router predicts it faster than fp32."""
    from cloud_hub.placements import model_cost

    fp32 = tiny.describe("tiny")
    quant = LoadedModel(quantize_model(copy.deepcopy(tiny.model), 4), tiny.tokenizer, tiny.path).describe("tiny")
    assert (fp32["quant"], quant["quant"]) == ("fp32", "int4")
    assert model_cost(fp32["config_json"], fp32["weight_bytes"]).bits_per_weight == pytest.approx(32.0)
    bits = model_cost(quant["config_json"], quant["weight_bytes"]).bits_per_weight
    assert 5.0 <= bits <= 8.5  # int4 g32 layers (5 bits with fp16 scale and minimum), int8 g32 table (8.5)


def test_the_kv_cache_setting_is_checked_and_followed(bundle: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        TorchEngine(kv_cache="int8")
    engine = TorchEngine(kv_cache="fp32")
    engine.load(str(bundle[0]))  # a quantized bundle, which "auto" would give an fp16 cache
    engine.prefill("r", [1, 2, 3], 8)
    assert engine._model.caches[-1].k.dtype == torch.float32


def test_the_hub_costs_the_kv_cache_the_engine_keeps(tiny: LoadedModel, bundle: tuple[Path, torch.nn.Module]) -> None:
    """fp32 models keep an fp32 cache, quantized ones fp16: the hub predicts those bytes."""
    from cloud_hub.placements import model_cost

    for path, bits_per_kv in ((tiny.path, 32), (bundle[0], 16)):
        engine = make_engine("torch")
        info = engine.load(str(path))
        engine.prefill("r", [1, 2, 3], 8)
        assert engine._model.caches[-1].k.element_size() * 8 == bits_per_kv
        assert model_cost(info["config_json"], info["weight_bytes"]).kv_bits == bits_per_kv
