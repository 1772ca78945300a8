"""Source precision (models.source_quant): each GGUF tensor served at the precision its file holds.

Checked against the GGUF itself: the mapping against each tensor's type (read with gguf's own
reader), the served weights against the fp32 model's (gguf.quants.dequantize of the same file),
exactly where the grid allows. The zoo models are skipped when not pulled (failed under
TANDEM_REQUIRE_MODELS=1, as tests/conftest.py:real_model does).
"""

from __future__ import annotations

import copy
import threading
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from device_profiles import ProfileError, load_profile, profile_from_dict
from models import zoo
from models.bundle import save_bundle
from models.corpus import documents
from models.errors import InvalidRequest
from models.eval import agreement, windows
from models.fast_decode import CpuDecoder
from models.gguf_loader import parameter_name
from models.loaded import LoadedModel
from models.quant import QuantEmbedding, QuantLinear, quantize_model
from models.runtime import load, prepared_record
from models.sampling import SamplingParams
from models.source_quant import layer_on_grid, module_of, served_bits
from tandem_cli.main import build_parser
from tests.conftest import real_model

SMOLLM2, GEMMA = "smollm2-135m-instruct", "gemma3-270m"


def source_model(name: str) -> LoadedModel:
    """The zoo model as served (its GGUF's precision): conftest's real_model at "source"."""
    return real_model(name, "source")


@cache
def gguf_types(name: str) -> dict[str, str]:
    """Our module name -> the GGUF's tensor type, for every tensor source quantization serves."""
    reader = gguf.GGUFReader(zoo.resolve(name), "r")
    types = {module_of(parameter_name(t.name)): t.tensor_type.name for t in reader.tensors}
    types.pop(None, None)
    return types


def served(model: nn.Module, module: str) -> QuantLinear | nn.Module:
    """The module serving `module`'s weight (a quantized embedding's inner layer)."""
    m = model.get_submodule(module)
    return m.linear if isinstance(m, QuantEmbedding) else m


@pytest.mark.parametrize("name", [SMOLLM2, pytest.param(GEMMA, marks=pytest.mark.slow)])  # gguf reads Gemma's in ~20 s
def test_every_tensor_is_served_at_its_gguf_precision(name: str) -> None:
    loaded = source_model(name)
    types = gguf_types(name)
    for module, source in types.items():
        m, bits = served(loaded.model, module), served_bits(source)
        if bits is None:
            assert isinstance(m, nn.Linear | nn.Embedding), module
        else:
            assert isinstance(m, QuantLinear) and (m.bits, m.group_size) == (bits, 32), (module, source)
    assert isinstance(loaded.model.tok_embeddings, QuantEmbedding)
    expected = {SMOLLM2: {"Q4_1": 4, "Q8_0": 8}, GEMMA: {"Q5_0": 8, "Q4_K": 4, "Q6_K": 8, "Q8_0": 8}}[name]
    assert {t: served_bits(t) for t in set(types.values())} == expected
    assert loaded.describe(name)["quant"].startswith("source(") and "q8_0->int8" in loaded.quant
    # Every block quantized on groups of 32: the kernels' one-call decode runs it.
    assert isinstance(loaded.model.decoder, CpuDecoder)


def test_smollm2_source_dequantizes_bit_exactly_to_the_fp32_weights() -> None:
    src, fp32 = source_model(SMOLLM2), real_model(SMOLLM2)
    for module in gguf_types(SMOLLM2):
        want = fp32.model.get_submodule(module).weight
        assert torch.equal(served(src.model, module).dequantize(), want), module


def test_gemma_q5_0_and_q8_0_are_exact_and_q4_k_within_fp16_rounding_of_its_scales() -> None:
    src, fp32 = source_model(GEMMA), real_model(GEMMA)
    # The types the entry recorded from the GGUF as it was built (reading Gemma's GGUF again takes
    # ~20 s; the slow mapping test checks them against the file). A wrong record fails here too:
    # it would hold a rounded tensor to exactness.
    types = {t["module"]: t["source"] for t in prepared_record(GEMMA, "source")["tensors"]}
    seen = set()
    for module, source in types.items():
        layer, want = served(src.model, module), fp32.model.get_submodule(module).weight
        got = layer.dequantize()
        if source in ("Q5_0", "Q8_0"):
            assert torch.equal(got, want), module
        else:
            # fp16 keeps 11 significant bits: a scale or minimum moves by at most 2^-11 of itself
            # (Q4_K's codes reach 15); Q6_K is rounded to nearest on int8 (half a step).
            scale, minimum = layer.scale.float(), layer.minimum.float() if layer.bits == 4 else 0
            step = 15 * scale * 2**-11 + abs(minimum) * 2**-11 if source == "Q4_K" else scale / 2
            err = (got - want).abs().reshape(*scale.shape[:2], -1)
            assert bool((err <= step * 1.001 + 1e-7).all()), (module, source)
        seen.add(source)
    assert seen == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_each_exact_grid_reproduces_gguf_dequantization(kind: str, tiny: LoadedModel) -> None:
    """The grids no zoo model holds (Q4_0), on blocks gguf.quants writes; Q4_K is the zoo's Gemma."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 128)) * 0.05).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    blocks = gguf.quants.quantize(w, qtype)
    want = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).reshape(w.shape).copy())
    tensor = SimpleNamespace(name="blk.0.ffn_up.weight", tensor_type=qtype, data=blocks)
    layer = layer_on_grid(tensor, want, tiny.config)
    assert layer.bits == (4 if kind.startswith("Q4") else 8) and layer.group_size == 32
    assert torch.equal(layer.dequantize(), want)


def test_smollm2_source_agrees_with_fp32_on_held_out_text() -> None:
    src, fp32 = source_model(SMOLLM2), real_model(SMOLLM2)
    try:
        texts = [d.text for d in documents("eval", limit=2)]
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    held_out = windows(fp32.tokenizer, texts, 128)
    assert agreement(fp32.model, src.model, held_out) >= 0.98


def test_tiny_source_keeps_f32_tensors_dense_and_q8_0_exact(tiny_path: Path, tiny: LoadedModel) -> None:
    src = load(tiny_path, quant="source", use_cache=False)
    blk = src.model.layers[0]
    assert isinstance(blk.attention.wq, nn.Linear) and isinstance(src.model.tok_embeddings, nn.Embedding)
    assert isinstance(blk.feed_forward.w_up, QuantLinear) and blk.feed_forward.w_up.bits == 8
    assert torch.equal(blk.feed_forward.w_up.dequantize(), tiny.model.layers[0].feed_forward.w_up.weight)
    assert src.quant in ("source(f32->fp32,q8_0->int8)", "source(q8_0->int8,f32->fp32)")


def test_quant_is_checked_and_a_bundle_serves_its_own(tiny_path: Path, tiny: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="quant must be one of fp32, source, int8, int4; got 'bogus'"):
        load(tiny_path, quant="bogus")
    bundle = save_bundle(LoadedModel(quantize_model(copy.deepcopy(tiny.model), 4), tiny.tokenizer, tiny.path),
                         tmp_path / "int4", "tiny")  # fmt: skip
    assert load(bundle, quant="source").describe("b")["quant"] == "int4"
    assert load(bundle).describe("b")["quant"] == "int4"
    with pytest.raises(InvalidRequest, match="bundle of int4 weights and cannot be served as fp32"):
        load(bundle, quant="fp32")


def test_int4_quant_is_what_tandem_optimize_builds(tiny_path: Path, tiny: LoadedModel) -> None:
    int4 = load(tiny_path, quant="int4", use_cache=False)
    want = quantize_model(copy.deepcopy(tiny.model), 4)
    assert int4.describe("t")["quant"] == "int4"
    assert torch.equal(int4.model.layers[0].attention.wq.q, want.layers[0].attention.wq.q)


def test_quantized_prepared_entry_round_trips(tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    first = load(tiny_path, quant="source")  # builds and writes the entry
    again = load(tiny_path, quant="source")  # reads it: modules rebuilt from the layout
    assert again.quant == first.quant
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_device_profile_quant_defaults_to_source_and_is_checked() -> None:
    assert load_profile("cpu-2core").quant == "source"
    fields = {
        "name": "x", "description": "d", "kind": "edge", "memory_gb": 1, "memory_bandwidth_gbs": 1,
        "compute_tflops": 1, "power_active_w": 1, "power_idle_w": 0, "backends": ["torch"],
        "link": {"rtt_ms": 1, "uplink_mbps": 1, "downlink_mbps": 1},
    }  # fmt: skip
    assert profile_from_dict({**fields, "quant": "int8"}).quant == "int8"
    with pytest.raises(ProfileError, match="quant must be one of"):
        profile_from_dict({**fields, "quant": "int3"})


def test_agent_cli_parses_quant() -> None:
    base = ["agent", "run", "--hub", "h:1", "--profile", "cpu-2core"]
    assert build_parser().parse_args(base).quant is None  # the profile's
    for quant in ("source", "fp32", "int8", "int4"):
        assert build_parser().parse_args([*base, "--quant", quant]).quant == quant
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--quant", "int3"])


def test_agent_default_serves_source_on_the_kernels(tmp_path: Path) -> None:
    from edge_agent.runner import build_agent

    source_model(SMOLLM2)  # skips when not pulled
    agent = build_agent("127.0.0.1:1", "cpu-2core", SMOLLM2, tmp_path / "state")
    served_model = agent.engine
    assert served_model.info["quant"] == "source(q4_1->int4,q8_0->int8)"
    decoder = served_model.loaded.model.decoder
    assert isinstance(decoder, CpuDecoder)
    events = list(served_model.stream([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True), threading.Event()))
    assert len(events) == 4 and decoder.built and decoder.declined == ""  # decoded by the kernels' route
