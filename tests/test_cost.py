"""The analytic cost model: parameter counts against the real module, monotonicity, calibration."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from device_profiles import Efficiency, LinkSpec, load_profile
from models.config import ModelConfig
from models.transformer import Transformer
from partitioner.cost import Estimate, ModelCost, fits, predict

SMOLLM2 = ModelConfig(
    arch="llama",
    n_layers=30,
    dim=576,
    ffn_dim=1536,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    context_length=8192,
    norm_eps=1e-5,
    rope_base=100000.0,
    rope_local_base=100000.0,
    tied_embeddings=True,
)
# Gemma-3-like shape (qk norms, sandwich norms) and an untied head, to exercise every counted tensor.
GEMMA_LIKE = ModelConfig(
    arch="gemma3",
    n_layers=3,
    dim=64,
    ffn_dim=160,
    n_heads=4,
    n_kv_heads=1,
    head_dim=32,
    vocab_size=300,
    context_length=512,
    norm_eps=1e-6,
    rope_base=1e6,
    rope_local_base=1e4,
    sliding_window=16,
    sliding_window_pattern=6,
    act="gelu_tanh",
    qk_norm=True,
    sandwich_norm=True,
    tied_embeddings=False,
)


def _meta_numel(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cfg", [SMOLLM2, GEMMA_LIKE], ids=["smollm2", "gemma-like-untied"])
def test_param_count_matches_transformer(cfg: ModelConfig) -> None:
    cost = ModelCost.from_config(cfg)
    assert cost.n_params == _meta_numel(cfg)
    assert cost.weight_bytes == 4 * cost.n_params


def test_smollm2_sizes() -> None:
    cost = ModelCost.from_config(SMOLLM2)
    assert cost.n_params == 134_515_008
    assert cost.weight_bytes_per_token == cost.weight_bytes  # tied: the embedding is the head, read each token
    assert cost.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4  # K and V, every layer, fp32
    untied = ModelCost.from_config(dataclasses.replace(SMOLLM2, tied_embeddings=False))
    assert untied.n_params == cost.n_params + 49152 * 576
    assert untied.weight_bytes_per_token == cost.weight_bytes_per_token  # the untied table is only looked up
    assert cost.flops_per_token(1000) > cost.flops_per_token(10)  # attention grows with context


def test_more_prompt_tokens_larger_ttft() -> None:
    profile, cost = load_profile("jetson-orin-nano"), ModelCost.from_config(SMOLLM2, 16)
    ttfts = [predict(profile, cost, n, 16).ttft_ms for n in (1, 64, 512, 2048, 8192)]
    assert ttfts == sorted(ttfts) and len(set(ttfts)) == len(ttfts)


def test_faster_bandwidth_smaller_tpot() -> None:
    profile, cost = load_profile("raspberry-pi-5"), ModelCost.from_config(SMOLLM2)
    faster = dataclasses.replace(profile, memory_bandwidth_gbs=2 * profile.memory_bandwidth_gbs)
    assert predict(faster, cost, 128, 64).tpot_ms < predict(profile, cost, 128, 64).tpot_ms


def test_four_bit_weights_smaller_tpot() -> None:
    for name in ("cpu-2core", "raspberry-pi-5", "jetson-orin-nano", "rtx-4090-desktop"):
        profile = load_profile(name)
        fp32 = predict(profile, ModelCost.from_config(SMOLLM2, 32.0), 128, 64)
        q4 = predict(profile, ModelCost.from_config(SMOLLM2, 4.5), 128, 64)
        assert q4.tpot_ms < fp32.tpot_ms, name
        assert q4.edge_energy_j < fp32.edge_energy_j, name


def test_slower_link_costs_time_not_energy() -> None:
    profile, cost = load_profile("jetson-agx-orin"), ModelCost.from_config(SMOLLM2, 16)
    slow = dataclasses.replace(profile, link=LinkSpec(rtt_ms=200, uplink_mbps=1, downlink_mbps=1))
    fast_est, slow_est = predict(profile, cost, 512, 32), predict(slow, cost, 512, 32)
    assert slow_est.ttft_ms > fast_est.ttft_ms and slow_est.tpot_ms > fast_est.tpot_ms
    assert slow_est.energy_j == fast_est.energy_j


def test_cpu_2core_calibration() -> None:
    """Measured here: fp32 SmolLM2-135M prefills 512 tokens in about 1.0 s and decodes about 20 tok/s."""
    est = predict(load_profile("cpu-2core"), ModelCost.from_config(SMOLLM2, 32.0), 512, 128)
    assert est.prefill_ms == pytest.approx(1000, rel=0.35)
    assert est.ttft_ms == pytest.approx(1000, rel=0.35)
    assert est.tpot_ms == pytest.approx(50, rel=0.35)
    assert est.total_ms == pytest.approx(est.ttft_ms + 127 * est.tpot_ms)


def test_cloud_has_no_edge_energy() -> None:
    est = predict(load_profile("cloud-h100"), ModelCost.from_config(SMOLLM2, 16), 256, 64)
    assert est.edge_energy_j == 0.0
    assert est.energy_j > 0.0
    edge = predict(load_profile("jetson-orin-nano"), ModelCost.from_config(SMOLLM2, 16), 256, 64)
    assert edge.edge_energy_j == edge.energy_j > 0.0


def test_prefill_never_below_one_weight_read() -> None:
    # A device with huge compute but modest bandwidth: one prompt token still reads every weight once.
    profile = dataclasses.replace(load_profile("cpu-2core"), compute_tflops=1e6, efficiency=Efficiency(1.0, 1.0))
    cost = ModelCost.from_config(SMOLLM2)
    est = predict(profile, cost, 1, 1)
    assert est.prefill_ms == pytest.approx(1e3 * cost.weight_bytes_per_token / (profile.memory_bandwidth_gbs * 1e9))


def test_fits() -> None:
    pi = load_profile("raspberry-pi-5")
    assert fits(pi, ModelCost.from_config(SMOLLM2), 8192)
    # An 8B-parameter llama shape in fp16 is 16 GB of weights: far beyond a Pi's 8 GB.
    big = dataclasses.replace(
        SMOLLM2, n_layers=32, dim=4096, ffn_dim=14336, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=128256
    )
    big_cost = ModelCost.from_config(big, 16.0)
    assert not fits(pi, big_cost, 2048)
    assert fits(load_profile("cloud-h100"), big_cost, 2048)
    # The KV cache counts: a model that fits with a short context may not fit with a huge one.
    smol = ModelCost.from_config(SMOLLM2)
    assert not fits(pi, smol, 200_000)


def test_bad_requests_raise() -> None:
    profile, cost = load_profile("cpu-2core"), ModelCost.from_config(SMOLLM2)
    for prompt, new in ((0, 5), (5, 0)):
        with pytest.raises(ValueError):
            predict(profile, cost, prompt, new)
    with pytest.raises(ValueError):
        predict(profile, cost, 5, 5, context_bytes_in=-1)
    with pytest.raises(ValueError):
        ModelCost.from_config(SMOLLM2, bits_per_weight=0)
    assert isinstance(predict(profile, cost, 5, 5), Estimate)
