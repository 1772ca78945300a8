"""How well a MoE² gate routes, on requests it was not trained on: the measures, the weight decay's
cross-validation, and MoE²'s optimality-preserving claim (the full-set gate restricted to a subset
against a gate retrained on it). gate.py builds and trains the gate; this module only scores it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from partitioner.moe2.gate import Gate, GateConfig, train_gate

WEIGHT_DECAYS = (1e-3, 1e-2, 3e-2, 1e-1)
"""The penalties `choose_weight_decay` tries."""


def choose_weight_decay(
    features: np.ndarray,
    losses: np.ndarray,
    expert_ids: Sequence[str],
    feature_kind: str,
    config: GateConfig | None = None,
    grid: Sequence[float] = WEIGHT_DECAYS,
    folds: int = 5,
) -> float:
    """The weight decay of `grid` whose gates route best on held-out folds of the calibration requests
    (k-fold over contiguous folds, so that a fold holds other documents; the mean k = 1 routed loss;
    ties: the larger decay). The evaluation requests never choose it. `config` (default GateConfig())
    gives everything but the decay."""
    config = config or GateConfig()
    n = len(losses)
    edges = np.linspace(0, n, folds + 1).astype(int)
    scores = []
    for wd in grid:
        total = 0.0
        for a, b in itertools.pairwise(edges):
            train = np.r_[0:a, b:n]
            cfg = replace(config, weight_decay=wd)
            gate = train_gate(features[train], losses[train], expert_ids, feature_kind, cfg)
            total += routed_loss(gate.weights(features[a:b]), losses[a:b]) * (b - a)
        scores.append(total / n)
    return min(zip(scores, [-wd for wd in grid], strict=True))[1] * -1


def expected_loss(weights: np.ndarray, losses: np.ndarray) -> float:
    """Mean over requests of sum_e w[r, e] * L[r, e]: the training objective, unpenalised (bits per byte)."""
    return float((weights * losses).sum(axis=1).mean())


def routed_loss(weights: np.ndarray, losses: np.ndarray) -> float:
    """Mean loss when each request goes to its top-weighted expert (ties: the lower index), as
    GatedObjective routes at k = 1 (bits per byte)."""
    top = np.argmax(weights, axis=1)  # (R,) argmax takes the first of equal weights
    return float(losses[np.arange(len(losses)), top].mean())


@dataclass(frozen=True)
class HeldOut:
    """A gate's loss on held-out requests against the references (bits per byte, lower is better)."""

    gate_expected: float
    """The gate's mixture: expected loss under its weights (what it was trained to minimise)."""
    gate_routed: float
    """Each request to the gate's top expert (k = 1 routing)."""
    best_single: float
    """The one expert best on these requests on average."""
    best_single_id: str
    """Which expert that is."""
    uniform: float
    """Equal weights over every expert (expected loss)."""
    oracle: float
    """Each request to its own best expert: no gate does better at k = 1."""


def held_out(gate: Gate, features: np.ndarray, losses: np.ndarray) -> HeldOut:
    """The gate's figures on (R, D) features and (R, E) losses of requests it was not trained on."""
    w, means = gate.weights(features), losses.mean(axis=0)
    best = int(np.argmin(means))
    return HeldOut(
        gate_expected=expected_loss(w, losses),
        gate_routed=routed_loss(w, losses),
        best_single=float(means[best]),
        best_single_id=gate.expert_ids[best],
        uniform=float(means.mean()),
        oracle=float(losses.min(axis=1).mean()),
    )


@dataclass(frozen=True)
class SubsetGap:
    """The full-set gate restricted to a subset against a gate retrained on it, on held-out requests."""

    subset: tuple[str, ...]
    """The subset's expert ids."""
    restricted: float
    """Expected loss of the full-set gate restricted to the subset (renormalised), bits per byte."""
    retrained: float
    """Expected loss of a gate trained on the subset alone (same config and seed)."""
    restricted_routed: float
    """The same two at k = 1 routing (each request to the top expert of the subset)."""
    retrained_routed: float
    """k = 1 routing of the retrained gate."""
    best_single: float
    """The subset's best single expert on the held-out requests: what a gate is there to beat."""

    @property
    def gap(self) -> float:
        """restricted - retrained: how much retraining would gain (negative: the full-set gate is better)."""
        return self.restricted - self.retrained

    @property
    def routed_gap(self) -> float:
        return self.restricted_routed - self.retrained_routed

    @property
    def kept(self) -> float:
        """Share of the retrained gate's gain over the best single expert that the restricted gate
        keeps (1: all of it; nan when retraining gains nothing)."""
        gain = self.best_single - self.retrained
        return (self.best_single - self.restricted) / gain if gain > 0 else float("nan")


def random_subsets(n_experts: int, count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`count` distinct random subsets of 0..n_experts-1, of sizes 2..n_experts-1 (sorted indices)."""
    if n_experts < 3:
        raise ValueError("subsets of sizes 2..E-1 need E >= 3 experts")
    rng, out = np.random.default_rng(seed), []
    while len(out) < count:
        size = int(rng.integers(2, n_experts))
        s = tuple(sorted(int(i) for i in rng.choice(n_experts, size, replace=False)))
        if s not in out:
            out.append(s)
    return out


def optimality_gaps(
    gate: Gate,
    calibration: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
    subsets: Sequence[Sequence[int]],
) -> list[SubsetGap]:
    """MoE²'s claim on our data: for each subset (indices into `gate.expert_ids`), the full-set gate
    restricted to it against a gate retrained on the calibration (features, losses) with the same
    config, both measured on the evaluation (features, losses). Losses are (R, E) over all experts."""
    (x_cal, l_cal), (x_eval, l_eval) = calibration, evaluation
    out = []
    for s in subsets:
        ids = [gate.expert_ids[i] for i in s]
        full = gate.restricted(ids).weights(x_eval)  # (R, |S|) renormalised over S
        cfg = gate.manifest.config
        again = train_gate(x_cal, l_cal[:, list(s)], ids, gate.manifest.feature_kind, cfg).weights(x_eval)
        sub = l_eval[:, list(s)]  # (R, |S|)
        routed = routed_loss(full, sub), routed_loss(again, sub)
        best = float(sub.mean(axis=0).min())
        out.append(SubsetGap(tuple(ids), expected_loss(full, sub), expected_loss(again, sub), *routed, best))
    return out
