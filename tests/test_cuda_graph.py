"""Decode with every shape fixed (what a CUDA graph captures), and the CUDA-graph engine itself.

The fixed step's arithmetic is checked on CPU against the ordinary decode path, so CI covers it;
capture and replay need a GPU (tests marked `gpu`, run on the device tool's machine).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from edge_agent.engines.cuda_graph import DecodeGraph
from edge_agent.engines.torch_engine import TorchEngine
from models.bundle import save_bundle
from models.loaded import LoadedModel
from models.quant import QuantLinear, dequantized, quantize_model
from models.transformer import Step, Transformer

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the device tool lends one to some tasks)"
)


def _decode_both_ways(model: Transformer, prompt: torch.Tensor, steps: int) -> tuple[list, list]:
    """Greedy decode after `prompt` twice over fresh caches: forward_layers, then forward_fixed.
    Returns each way's list of (V,) logits."""
    runs = []
    for fixed in (False, True):
        model.setup_cache(1, 40)
        with torch.inference_mode():
            h = model.forward_layers(model.embed(prompt), Step.at(0, prompt.shape[1]))
            logits, out = model.head(h[:, -1])[0], []
            for pos in range(prompt.shape[1], prompt.shape[1] + steps):
                h = model.embed(logits.argmax().view(1, 1))
                h = model.forward_fixed(h, torch.tensor([pos])) if fixed else model.forward_layers(h, Step.at(pos, 1))
                logits = model.head(h[:, -1])[0]
                out.append(logits)
        runs.append(out)
    return runs[0], runs[1]


def test_fixed_shape_decode_computes_what_decode_computes(tiny: LoadedModel) -> None:
    """Past Gemma's sliding window (8 slots in the tiny model) too, and with stale values in the
    slots after the position, which the mask must hide."""
    model = copy.deepcopy(tiny.model)
    model.setup_cache(1, 40)
    prompt = torch.randint(0, tiny.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    want, got = _decode_both_ways(model, prompt, 20)
    for cache in model.caches:  # the second run's caches; poison what a fixed step must not read
        cache.k[:, :, 30:] = 1e4
        cache.v[:, :, 30:] = -1e4
    with torch.inference_mode():
        again = model.head(model.forward_fixed(model.embed(want[-2].argmax().view(1, 1)), torch.tensor([24])))[0, -1]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, want[-1], atol=1e-5, rtol=1e-5)


def test_fixed_shape_decode_of_an_int4_model(tiny: LoadedModel) -> None:
    """The quantized model with an fp16 cache, on the same per-layer ops both ways (the one-C-call
    CPU decoder is held to the torch path in test_kernels). The kernels round activations to
    int16, so the last bits of attention's sums (summed over more slots here) can move a rounding
    step: the tolerance is test_kernels' for the same arithmetic."""
    model = quantize_model(copy.deepcopy(tiny.model), 4)
    model.kv_dtype, model.fast_decode = torch.float16, False
    prompt = torch.randint(0, tiny.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    want, got = _decode_both_ways(model, prompt, 12)
    got, want = torch.stack(got), torch.stack(want)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, atol=5e-4 * float(want.abs().max()), rtol=1e-3)


def test_fixed_shape_decode_refuses_what_it_cannot_run(tiny: LoadedModel) -> None:
    model = copy.deepcopy(tiny.model)
    model.setup_cache(1, 16, start=0, end=1)
    h = model.embed(torch.tensor([[1]]))
    with pytest.raises(ValueError, match="need KV caches"):
        model.forward_fixed(h, torch.tensor([0]))
    with pytest.raises(ValueError, match="one token"):
        model.forward_fixed(model.embed(torch.tensor([[1, 2]])), torch.tensor([0]), 0, 1)
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraph(model, 1, 0)


def test_a_quantized_layer_keeps_its_dense_weight_until_a_buffer_changes() -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    layer = QuantLinear(w, 4, 32)
    dense = layer.dense(torch.float32)
    torch.testing.assert_close(dense, layer.dequantize(), atol=0, rtol=0)
    assert layer.dense(torch.float32) is dense  # kept, not rebuilt
    assert layer.dense(torch.float64).dtype == torch.float64
    layer.load_state_dict(QuantLinear(w * 2, 4, 32).state_dict())  # replaces the buffers' values
    layer.scale = layer.scale.clone()  # and one buffer object
    torch.testing.assert_close(layer.dense(torch.float32), layer.dequantize(), atol=0, rtol=0)
    assert not torch.equal(layer.dense(torch.float32), dense)


def test_the_engine_refuses_bad_tokens_and_slots_before_running_anything(tiny: LoadedModel, tiny_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a cuda device"):
        TorchEngine("cpu", compile=True)
    engine = TorchEngine("cpu")
    engine.load(str(tiny_path))
    vocab = tiny.config.vocab_size
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        engine.prefill("r", [1, vocab], 8)
    with pytest.raises(ValueError, match="non-empty"):
        engine.prefill("r", [], 8)
    logits = engine.prefill("r", [1, 2, 3], 4)
    with pytest.raises(ValueError, match="token ids"):
        engine.decode("r", -1)
    engine.decode("r", int(logits.argmax()))  # slot 3, the last one
    with pytest.raises(ValueError, match="beyond the cache of 4 slots"):
        engine.decode("r", 1)
    engine.load(str(tiny_path))  # a new model ends the old one's requests
    with pytest.raises(KeyError, match="prefill it first"):
        engine.decode("r", 1)


def _greedy(engine: TorchEngine, request: str, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    logits, tokens, all_logits = engine.prefill(request, prompt, len(prompt) + steps), [], []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = engine.decode(request, tokens[-1])
        all_logits.append(logits.float().cpu())
    return tokens, torch.stack(all_logits)


@pytest.fixture
def int4_bundle(tiny: LoadedModel, tmp_path: Path) -> Path:
    model = quantize_model(copy.deepcopy(tiny.model), 4)
    return save_bundle(LoadedModel(model, tiny.tokenizer, tiny.path), tmp_path / "int4", "tiny-int4")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_cuda_graph_decode_matches_eager_cuda_and_cpu(
    variant: str, tiny: LoadedModel, tiny_path: Path, int4_bundle: Path
) -> None:
    source = str(tiny_path if variant == "fp32" else int4_bundle)
    engines = [TorchEngine("cuda"), TorchEngine("cuda", cuda_graphs=False), TorchEngine("cpu")]
    for engine in engines:
        engine.load(source)
    assert [e.graphs for e in engines] == [True, False, False]
    cpu_engine = engines[2]  # the same dequantized weights on torch's fp32 CPU matmuls: the GPU's arithmetic
    cpu_engine.loaded = dataclasses.replace(cpu_engine.loaded, model=dequantized(cpu_engine.loaded.model))
    prompt = tiny.tokenizer.encode("the cat sat on the mat")
    (graph_ids, graph), (eager_ids, eager), (cpu_ids, cpu) = (_greedy(e, "r", prompt, 24) for e in engines)
    assert graph_ids == eager_ids == cpu_ids
    torch.testing.assert_close(graph, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(graph, cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@needs_gpu
def test_a_compiled_graph_decodes_like_eager(tiny: LoadedModel, tiny_path: Path) -> None:
    compiled, eager = TorchEngine("cuda", compile=True), TorchEngine("cuda", cuda_graphs=False)
    for engine in (compiled, eager):
        engine.load(str(tiny_path))
    prompt = tiny.tokenizer.encode("the cat sat on the mat")
    (got_ids, got), (want_ids, want) = (_greedy(e, "r", prompt, 16) for e in (compiled, eager))
    assert got_ids == want_ids
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_released_requests_hand_their_graph_to_the_next_one(tiny: LoadedModel, tiny_path: Path) -> None:
    engine, fresh = TorchEngine("cuda"), TorchEngine("cuda")
    engine.load(str(tiny_path))
    fresh.load(str(tiny_path))
    first = tiny.tokenizer.encode("a long first prompt that fills the cache with other keys")
    second = tiny.tokenizer.encode("the cat")
    _greedy(engine, "a", first, 30)
    graph = engine._requests["a"].graph
    engine.release("a")
    got = _greedy(engine, "b", second, 20)  # same rounded cache length: takes a's caches and graph
    assert engine._requests["b"].graph is graph
    want = _greedy(fresh, "b", second, 20)
    assert got[0] == want[0]
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    # interleaved requests each replay their own graph over their own caches
    got = {r: [engine.prefill(r, p, len(p) + 8)] for r, p in (("c", second), ("d", first))}
    want = {r: [fresh.prefill(r, p, len(p) + 8)] for r, p in (("c", second), ("d", first))}
    assert engine._requests["c"].graph is None
    for _ in range(3):
        for r, token in (("c", 1), ("d", 2)):
            got[r].append(engine.decode(r, token))
            want[r].append(fresh.decode(r, token))
    assert engine._requests["c"].graph is not engine._requests["d"].graph
    for r in got:
        torch.testing.assert_close(torch.stack(got[r]), torch.stack(want[r]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="token ids"):  # refused on the host: the context stays usable
        engine.decode("c", tiny.config.vocab_size)
    torch.testing.assert_close(engine.decode("c", 1), fresh.decode("c", 1), atol=1e-5, rtol=1e-5)
    engine.load(str(tiny_path))  # a new model: no request, spare cache or graph survives it
    assert engine._requests == {} and engine._spare == []
