"""The onnxruntime engine against the torch engine, and the ONNX graph contract TensorRT builds from.

Tiny random models (llama and gemma3, tests/conftest.py); each graph is exported once into a
throwaway cache (about 10 s for llama, 30-40 s for the 7-layer gemma: torch.export's symbolic shapes).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="pip install 'tandem[onnx]' (make setup installs it)")
pytest.importorskip("onnxscript", reason="pip install 'tandem[onnx]' (make setup installs it)")
onnx = pytest.importorskip("onnx", reason="pip install 'tandem[onnx]' (make setup installs it)")

from edge_agent.engines.base import EngineUnavailable, InferenceEngine  # noqa: E402
from edge_agent.engines.onnx_engine import OnnxEngine, OnnxEngineOptions  # noqa: E402
from edge_agent.engines.registry import make_engine  # noqa: E402
from edge_agent.engines.torch_engine import TorchEngine  # noqa: E402
from models import zoo  # noqa: E402
from models.bundle import save_bundle  # noqa: E402
from models.chat import render_chat  # noqa: E402
from models.loaded import LoadedModel  # noqa: E402
from models.onnx_export import ExportOptions, UnsupportedQuantization, cached_export, graph_names  # noqa: E402
from models.quant import QuantLinear, dequantized, quantize_model  # noqa: E402
from models.runtime import load  # noqa: E402
from models.transformer import Step  # noqa: E402
from tests.conftest import real_model  # noqa: E402

STEPS = 10
REAL_CACHE = zoo.cache_dir()  # before tmp_cache points the tiny models' tests elsewhere


@pytest.fixture(scope="module")
def int4_bundle(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = quantize_model(copy.deepcopy(tiny.model), 4)
    out = tmp_path_factory.mktemp("bundle") / f"int4-{tiny.config.arch}"
    return save_bundle(LoadedModel(model, tiny.tokenizer, tiny.path), out, "tiny")


def _engines(model: str) -> tuple[InferenceEngine, InferenceEngine]:
    # The reference keeps an fp32 KV cache, as the ONNX graph does: the comparisons then see only
    # the kernels' int16 activations, not also the torch engine's fp16 cache for quantized models.
    reference, engine = TorchEngine(kv_cache="fp32"), make_engine("onnxruntime")
    reference.load(model)
    engine.load(model)
    return reference, engine


@pytest.fixture(scope="module")
def fp32_engines(tiny_path: Path, tmp_cache: Path) -> tuple[InferenceEngine, InferenceEngine]:
    return _engines(str(tiny_path))


@pytest.fixture(scope="module")
def int4_engines(int4_bundle: Path, tmp_cache: Path) -> tuple[InferenceEngine, InferenceEngine]:
    return _engines(str(int4_bundle))


def _prompt(tiny: LoadedModel) -> list[int]:
    return tiny.tokenizer.encode("the cat sat on the mat")


def _io(path: Path) -> dict[str, tuple[int, list]]:
    """name -> (element type, dims as int or dim_param string) of every graph input and output."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in [*graph.input, *graph.output]
    }


# -- the graph contract -------------------------------------------------------------------------------


def test_graph_contract_names_dtypes_and_dynamic_axes(tiny: LoadedModel, tmp_cache: Path) -> None:
    cfg = tiny.config
    path = cached_export(tiny)
    onnx.checker.check_model(str(path), full_check=True)
    names = graph_names(cfg.n_layers, ExportOptions())
    proto = onnx.load(str(path), load_external_data=False)
    assert tuple(v.name for v in proto.graph.input) == names.inputs
    assert tuple(v.name for v in proto.graph.output) == names.outputs
    assert names.inputs[0] == "input_ids" and names.outputs[0] == "logits"
    assert len(names.inputs) == 1 + 2 * cfg.n_layers
    io = _io(path)
    F32, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert io["input_ids"] == (I64, [1, "T"])
    assert io["logits"] == (F32, [1, 1, cfg.vocab_size])
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            assert io[f"past_{kind}_{i}"] == (F32, [1, cfg.n_kv_heads, "P", cfg.head_dim])
            elem, dims = io[f"present_{kind}_{i}"]
            assert elem == F32 and dims[0] == 1 and dims[1] == cfg.n_kv_heads and dims[3] == cfg.head_dim
            assert isinstance(dims[2], str) and {"P", "T"} <= set(dims[2].replace("+", " ").split())
    # plain ONNX (what TensorRT parses): no vendor domain in an fp32 graph
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}


def test_int4_graph_runs_the_codes_as_matmulnbits_with_uint8_zero_points(int4_bundle: Path, tmp_cache: Path) -> None:
    loaded = load(int4_bundle)
    int4 = [m for m in loaded.model.modules() if isinstance(m, QuantLinear) and m.bits == 4]
    int8 = [m for m in loaded.model.modules() if isinstance(m, QuantLinear) and m.bits == 8]  # embedding/head
    path = cached_export(loaded)
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(int4) == 7 * loaded.config.n_layers
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft" and attrs["bits"] == 4 and attrs["block_size"] == 32
        weights, zeros = inits[node.input[1]], inits[node.input[3]]  # explicit zero points: the fast path
        assert weights.data_type == zeros.data_type == onnx.TensorProto.UINT8
        assert not onnx.numpy_helper.to_array(zeros).any()
    # no fp32 copy of an int4 weight, in either orientation; int8 layers are fp32 MatMuls (module docstring)
    shapes = {m.shape for m in int4} | {m.shape[::-1] for m in int4}
    floats = {tuple(t.dims) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert not shapes & floats
    assert all(m.shape[::-1] in floats for m in int8)


# -- conformance with the torch engine ----------------------------------------------------------------


def _greedy_pair(
    reference: InferenceEngine, engine: InferenceEngine, prompt: list[int], atol: float
) -> tuple[list[int], list[int]]:
    """Decode STEPS tokens on both engines, each fed the reference's greedy token, with a second request
    interleaved on the onnxruntime engine; checks logits at every step, returns both greedy paths."""
    want, got = [], []
    ref, out = reference.prefill("a", prompt, len(prompt) + STEPS), engine.prefill("a", prompt, len(prompt) + STEPS)
    other = engine.prefill("b", prompt[:2], 2 + STEPS)
    for _ in range(STEPS):
        torch.testing.assert_close(out, ref, atol=atol, rtol=0)
        want.append(int(ref.argmax()))
        got.append(int(out.argmax()))
        assert want[-1] in out.topk(5).indices and got[-1] in ref.topk(5).indices
        ref, out = reference.decode("a", want[-1]), engine.decode("a", want[-1])
        other = engine.decode("b", int(other.argmax()))
    return want, got


def test_fp32_engine_matches_torch_engine(
    fp32_engines: tuple[InferenceEngine, InferenceEngine], tiny: LoadedModel
) -> None:
    want, got = _greedy_pair(*fp32_engines, _prompt(tiny), atol=1e-4)
    assert got == want


def test_second_request_keeps_its_own_cache(fp32_engines: tuple[InferenceEngine, InferenceEngine], tiny) -> None:
    reference, engine = fp32_engines
    prompt = _prompt(tiny)
    engine.prefill("x", prompt, len(prompt) + 4)
    alone = reference.prefill("y", prompt[:3], 8)
    interleaved = engine.prefill("y", prompt[:3], 8)
    engine.decode("x", 5)  # x grows while y waits
    torch.testing.assert_close(engine.decode("y", 7), reference.decode("y", 7), atol=1e-4, rtol=0)
    torch.testing.assert_close(interleaved, alone, atol=1e-4, rtol=0)
    engine.release("x")
    with pytest.raises(KeyError, match="prefill it first"):
        engine.decode("x", 1)
    engine.release("never-started")  # ignored


def test_int4_engine_computes_with_the_bundles_own_weights(
    int4_engines: tuple[InferenceEngine, InferenceEngine], int4_bundle: Path, tiny: LoadedModel
) -> None:
    reference, engine = int4_engines
    prompt = _prompt(tiny)
    dense = dequantized(load(int4_bundle).model)  # the exact weights in fp32: ORT must agree to fp32 rounding
    dense.setup_cache(1, len(prompt))
    with torch.no_grad():
        exact = dense(torch.tensor([prompt]), Step.at(0, len(prompt)))[0, -1]
    torch.testing.assert_close(engine.prefill("exact", prompt, len(prompt)), exact, atol=2e-4, rtol=0)
    # the torch engine's int kernels round activations to int16: close, each greedy token in the other's top 5
    _greedy_pair(reference, engine, prompt, atol=2e-2)


def test_layer_ranges_equal_the_whole_model(
    fp32_engines: tuple[InferenceEngine, InferenceEngine], tiny: LoadedModel
) -> None:
    if tiny.config.arch != "llama":
        pytest.skip("one architecture is enough for layer ranges (each range is its own export)")
    _, engine = fp32_engines
    ids = torch.tensor([_prompt(tiny)])
    k, n = 1, tiny.config.n_layers
    whole = engine.prefill("whole", ids[0].tolist(), ids.shape[1] + 1)
    h = engine.run_layers("split", tiny.model.embed(ids), 0, k, position=0)
    h = engine.run_layers("split", h, k, n, position=0)
    torch.testing.assert_close(tiny.model.head(h)[0, -1], whole, atol=1e-4, rtol=0)
    nxt = tiny.model.embed(torch.tensor([[int(whole.argmax())]]))
    h = engine.run_layers("split", engine.run_layers("split", nxt, 0, k, ids.shape[1]), k, n, ids.shape[1])
    torch.testing.assert_close(
        tiny.model.head(h)[0, -1], engine.decode("whole", int(whole.argmax())), atol=1e-4, rtol=0
    )
    with pytest.raises(ValueError, match="only appends"):
        engine.run_layers("split", nxt, 0, k, position=2)


# -- bad input ----------------------------------------------------------------------------------------


def test_tensorrt_and_devices_fail_at_load_time() -> None:
    with pytest.raises(EngineUnavailable, match="TensorRT is not installed"):
        make_engine("tensorrt")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(EngineUnavailable, match="no CUDA provider"):
            make_engine("onnxruntime", "cuda")
    with pytest.raises(EngineUnavailable, match="cpu or cuda"):
        make_engine("onnxruntime", "tpu")
    with pytest.raises(EngineUnavailable, match="call load"):
        make_engine("onnxruntime").prefill("r", [1, 2], 4)


def test_unsupported_quantization_is_refused_at_load(tiny: LoadedModel, tmp_path: Path, tmp_cache: Path) -> None:
    # int8 with groups of 8: MatMulNBits (int8 runs on it with accuracy_level 4) tiles groups of >= 16
    model = quantize_model(copy.deepcopy(tiny.model), 8, group_size=8)
    bundle = save_bundle(LoadedModel(model, tiny.tokenizer, tiny.path), tmp_path / "g8", "tiny")
    with pytest.raises(UnsupportedQuantization, match="group size 8"):
        OnnxEngine("cpu", OnnxEngineOptions(accuracy_level=4)).load(str(bundle))


def test_requests_beyond_their_length_are_refused(fp32_engines: tuple[InferenceEngine, InferenceEngine]) -> None:
    _, engine = fp32_engines
    with pytest.raises(ValueError, match="max_len"):
        engine.prefill("long", [1, 2, 3], 2)
    engine.prefill("short", [1, 2], 3)
    engine.decode("short", 3)
    with pytest.raises(ValueError, match="is full"):
        engine.decode("short", 4)


# -- the real model -----------------------------------------------------------------------------------


@pytest.mark.real
def test_real_smollm2_fp32_matches_the_torch_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(REAL_CACHE))
    loaded = real_model("smollm2-135m-instruct")
    text = render_chat(
        loaded.tokenizer.info.chat_template, [{"role": "user", "content": "What is the capital of France?"}]
    )
    prompt = loaded.tokenizer.encode(text)
    reference, engine = _engines("smollm2-135m-instruct")  # the first run exports (minutes), then cached
    tokens = {}
    for name, e in (("torch", reference), ("onnxruntime", engine)):
        logits, tokens[name] = e.prefill("r", prompt, len(prompt) + 16), []
        for _ in range(16):
            tokens[name].append(int(logits.argmax()))
            logits = e.decode("r", tokens[name][-1])
    assert tokens["onnxruntime"] == tokens["torch"]
