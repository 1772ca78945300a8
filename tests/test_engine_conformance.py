"""One conformance suite for every registered engine (issue 6, item 6).

Each engine in `edge_agent.engines.registry.ENGINES` that can run here loads the same tiny models
(llama and gemma3) as fp32, int8 and int4 bundles and is held to:

- fp32: the same greedy tokens as the torch fp32 reference (our transformer through Generator);
- int8 / int4: the closeness check against the bundle's own weights dequantized and run by torch
  in fp32, teacher-forced on the fp32 model's greedy sequence: at every step the engine's top-1 is
  within the reference's top-5 and the reference's top-1 within the engine's top-5. (Against the
  unquantized model, random tiny weights lose too much to int4 for a top-5 check to mean anything;
  what quantization costs a real model is measured by benchmarks/quality.py.)
- the interface: interleaved requests keep their own caches, released requests are forgotten.

An engine that cannot run here (tensorrt without TensorRT and a GPU) is skipped with its own
EngineUnavailable message, which is itself the load-time error issue 6 asks for.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from edge_agent.engines.base import EngineUnavailable, InferenceEngine
from edge_agent.engines.registry import ENGINES, make_engine
from models.bundle import save_bundle
from models.loaded import LoadedModel
from models.quant import dequantized, quantize_model
from models.runtime import load
from models.sampling import SamplingParams
from models.transformer import Step

STEPS = 8


@pytest.fixture(scope="module")
def variants(tiny: LoadedModel, tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """variant name -> what an engine loads: the GGUF for fp32, bundles for the quantized ones."""
    out = {"fp32": str(tiny_path)}
    for bits in (8, 4):
        model = quantize_model(copy.deepcopy(tiny.model), bits)
        path = tmp_path_factory.mktemp("bundles") / f"int{bits}-{tiny.config.arch}"
        out[f"int{bits}"] = str(save_bundle(LoadedModel(model, tiny.tokenizer, tiny.path), path, "tiny"))
    return out


def _engine(name: str, model: str) -> InferenceEngine:
    try:
        engine = make_engine(name)
        engine.load(model)
    except EngineUnavailable as exc:
        pytest.skip(f"{name}: {exc}")
    return engine


def _teacher_forced(engine: InferenceEngine, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(len(tokens) + 1, V) logits: after the prompt, then after each forced token."""
    rows = [engine.prefill("tf", prompt, len(prompt) + len(tokens) + 1)]
    rows += [engine.decode("tf", t) for t in tokens]
    engine.release("tf")
    return torch.stack([r.float().cpu() for r in rows])


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_fp32_engines_give_the_reference_greedy_tokens(
    name: str, tiny: LoadedModel, variants: dict[str, str], tmp_cache: Path
) -> None:
    prompt = tiny.tokenizer.encode("the cat sat")
    want = tiny.generator().generate([prompt], SamplingParams(max_tokens=STEPS, ignore_eos=True))[0].token_ids
    engine = _engine(name, variants["fp32"])
    got, logits = [], engine.prefill("a", prompt, len(prompt) + STEPS)
    other = engine.prefill("b", prompt[:2], 4 + STEPS)  # interleaved: must not disturb "a"
    for _ in range(STEPS):
        got.append(int(logits.argmax()))
        logits = engine.decode("a", got[-1])
        other = engine.decode("b", int(other.argmax()))
    assert got == want
    engine.release("a")
    with pytest.raises(KeyError):
        engine.decode("a", 1)


def _dense_logits(bundle: str, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The bundle's exact weights, dequantized into plain fp32 layers and run by torch: the
    reference a quantized engine's arithmetic is held to. (len(tokens) + 1, V) logits."""
    model = dequantized(load(bundle).model)
    model.fast_decode = False
    ids = prompt + tokens
    model.setup_cache(1, len(ids))
    with torch.no_grad():
        return model(torch.tensor([ids]), Step.at(0, len(ids)))[0, len(prompt) - 1 :]


@pytest.mark.parametrize("variant", ["int8", "int4"])
@pytest.mark.parametrize("name", sorted(ENGINES))
def test_quantized_engines_pass_the_closeness_check(
    name: str, variant: str, tiny: LoadedModel, variants: dict[str, str], tmp_cache: Path
) -> None:
    prompt = tiny.tokenizer.encode("the cat sat")
    engine = _engine(name, variants[variant])
    greedy = tiny.generator().generate([prompt], SamplingParams(max_tokens=STEPS, ignore_eos=True))[0].token_ids
    got = _teacher_forced(engine, prompt, greedy)
    want = _dense_logits(variants[variant], prompt, greedy)
    assert got.shape == want.shape
    got_top5, want_top5 = got.topk(5).indices, want.topk(5).indices
    for step in range(len(got)):
        assert int(got[step].argmax()) in want_top5[step].tolist(), f"step {step}: top-1 not in reference top-5"
        assert int(want[step].argmax()) in got_top5[step].tolist(), f"step {step}: reference top-1 not in top-5"
    # Same weights: beyond top-5, the logits themselves agree closely (int16 activations, fp32 sums).
    torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=1e-3)
