"""Structured pruning: drop whole layers ranked by block influence on calibration text.

Block influence of a layer is 1 - cos(h_in, h_out), averaged over tokens: how much the layer
changes the residual stream it receives. Layers that change it least are dropped first. Each
remaining block keeps its own settings (Gemma's sliding or global attention follows the original
layer index), so the pruned model is the original with those layers skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import InvalidRequest
from models.transformer import Step, Transformer


@torch.inference_mode()
def block_influence(model: Transformer, sequences: Sequence[list[int]]) -> list[float]:
    """Mean 1 - cos(input, output) of every layer over the tokens of `sequences` (calibration text)."""
    n = model.cfg.n_layers
    totals, count = torch.zeros(n, dtype=torch.float64), 0
    for ids in sequences:
        model.setup_cache(1, len(ids))
        step = Step.at(0, len(ids))
        h = model.embed(torch.tensor([ids]))
        for i in range(n):
            out = model.forward_layers(h, step, i, i + 1)
            totals[i] += (1 - F.cosine_similarity(h[0].double(), out[0].double(), dim=-1)).sum()
            h = out
        count += len(ids)
    return (totals / max(count, 1)).tolist()


def prune_layers(model: Transformer, drop: int, influence: Sequence[float]) -> list[int]:
    """Remove the `drop` least influential layers in place; returns the kept original indices."""
    n = model.cfg.n_layers
    if not 0 <= drop < n:
        raise InvalidRequest(f"can drop 0 to {n - 1} of {n} layers, not {drop}")
    if len(influence) != n:
        raise InvalidRequest(f"need one influence score per layer ({n}), got {len(influence)}")
    dropped = set(sorted(range(n), key=lambda i: influence[i])[:drop])
    kept = [i for i in range(n) if i not in dropped]
    model.layers = nn.ModuleList(model.layers[i] for i in kept)
    model.cfg = dataclasses.replace(model.cfg, n_layers=len(kept))
    model.caches = [None] * len(kept)
    return kept
