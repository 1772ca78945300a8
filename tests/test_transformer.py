"""Layer ranges, the KV cache and padding, checked against full recomputation."""

from __future__ import annotations

import pytest
import torch

from models.loaded import LoadedModel
from models.transformer import Step


def _tokens(model: LoadedModel, n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_split_at_every_layer_equals_whole_model(tiny: LoadedModel) -> None:
    m, n = tiny.model, tiny.config.n_layers
    tokens = _tokens(tiny, 12)
    m.setup_cache(1, 12)
    whole = m(tokens, Step.at(0, 12))
    for k in range(n + 1):
        m.setup_cache(1, 12)
        h = m.forward_layers(m.embed(tokens), Step.at(0, 12), 0, k)
        h = m.forward_layers(h, Step.at(0, 12), k, None)
        torch.testing.assert_close(m.head(h), whole, atol=1e-5, rtol=1e-5, msg=f"split at {k}")


@torch.no_grad()
def test_partial_cache_serves_only_its_range(tiny: LoadedModel) -> None:
    m, n = tiny.model, tiny.config.n_layers
    tokens = _tokens(tiny, 6)
    m.setup_cache(1, 6, start=1, end=n)
    h = m.embed(tokens)
    with pytest.raises(ValueError, match="layer 0 has no KV cache"):
        m.forward_layers(h, Step.at(0, 6), 0, n)
    with pytest.raises(ValueError, match="outside"):
        m.forward_layers(h, Step.at(0, 6), 1, n + 1)


@torch.no_grad()
def test_incremental_decode_equals_full_recompute(tiny: LoadedModel) -> None:
    """Prefill 5 tokens, then feed 10 more one at a time: each step's logits equal a fresh full forward."""
    m = tiny.model
    tokens = _tokens(tiny, 15, seed=3)  # longer than the tiny Gemma's window of 8
    m.setup_cache(1, 15)
    steps = [m(tokens[:, :5], Step.at(0, 5))[:, -1]]
    for t in range(5, 15):
        steps.append(m(tokens[:, t : t + 1], Step.at(t, 1))[:, -1])
    for t, got in zip(range(4, 15), steps, strict=True):
        m2_len = t + 1
        m.setup_cache(1, m2_len)
        want = m(tokens[:, :m2_len], Step.at(0, m2_len))[:, -1]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"position {t}")


@torch.no_grad()
def test_left_padding_does_not_change_a_row(tiny: LoadedModel) -> None:
    m = tiny.model
    short, long = _tokens(tiny, 4, seed=5), _tokens(tiny, 9, seed=6)
    m.setup_cache(1, 4)
    alone = m(short, Step.at(0, 4))[:, -1]
    pad = torch.tensor([5, 0])
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    m.setup_cache(2, 9)
    both = m(batch, Step.at(0, 9, 2, pad))[:, -1]
    torch.testing.assert_close(both[0], alone[0], atol=1e-4, rtol=1e-4)


def test_sliding_layers_follow_gemma_pattern(tiny: LoadedModel) -> None:
    sliding = [blk.sliding for blk in tiny.model.layers]
    if tiny.config.arch == "gemma3":
        assert sliding == [True, True, True, True, True, False, True]
    else:
        assert not any(sliding)
