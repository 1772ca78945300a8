"""MoE²'s objective: a set function over expert subsets, lower is better, with a bound for pruning.

`GatedObjective` is the gate's calibration loss. The gate was trained once on the full expert set and
gives each calibration request r weights over ALL experts, W[r] (E,), summing to 1. On a subset S the
gate's weights are restricted to S and renormalised: MoE²'s key property is that the full-set gate
stays optimal on any subset, so selection never retrains it.

Routing a request within S (`route`, and `GatedObjective.value` for every request at once): order S
by the gate's weight (ties: lower index first); the top expert h answers, with up to k - 1 more of S
that share h's tokenizer, next in the gate's order (experts of other tokenizers cannot mix next-token
distributions with h's); their weights are renormalised to sum to 1 (equal weights if all are 0).

The loss of request r (bits per byte of its true continuation, B_r bytes long) with chosen experts c
and renormalised weights w, each expert's loss L[r, e] bits per byte:

    probability (exact): -log2( sum_c w_c * 2^(-L[r, c] * B_r) ) / B_r
        the experts' probabilities of the whole continuation, 2^(-L B), mixed; B_r = 1 (no lengths
        given) mixes the per-byte probabilities 2^(-L);
    mean_loss (an approximation): sum_c w_c * L[r, c]
        an upper bound on the exact loss (Jensen: -log2 is convex).

The hub mixes step by step (per token), which needs per-token losses: neither formula is that loss,
both are exact at k = 1. The objective of S is the mean of the loss over the R calibration requests.

For branch and bound (bounds.py, select.py): `lower_bound` bounds every completion of a search node
(any mixture's loss is at least its best member's, and at k > 1 at least what its top's weight
allows), valid whether or not the objective is monotone in S; `inert` names the experts that would
add an expert no request uses (the superset without it is as good and smaller); `prune` does both at
a node; `twins` names experts with the same tokenizer, weights and losses (one variant on several
devices), which fill the same places of every request's gate order: interchangeable in any subset.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from partitioner.moe2 import bounds

Mix = Literal["probability", "mean_loss"]


class Objective(ABC):
    """A set function over subsets of experts 0..n_experts-1: what selection minimises."""

    @property
    @abstractmethod
    def n_experts(self) -> int:
        """How many experts the function is defined over."""

    @abstractmethod
    def value(self, subset: Sequence[int], k: int) -> float:
        """The objective of `subset` (non-empty, distinct indices) with the top-k per request."""

    def inert(self, fixed: Sequence[int], allowed: Sequence[int], k: int) -> list[int]:
        """Experts x of `allowed` that no optimum holding fixed ∪ {x} can contain: each superset of
        fixed ∪ {x} has a member whose removal leaves its value bitwise equal (so the smaller set wins
        the tie). The default, none, never prunes: always valid."""
        return []

    def lower_bound(self, fixed: Sequence[int], allowed: Sequence[int], k: int) -> float:
        """A lower bound on value(T, k) for every non-empty T with fixed ⊆ T ⊆ fixed ∪ allowed.
        The default, -inf, never prunes: always valid."""
        return -math.inf

    def prune(
        self, fixed: Sequence[int], allowed: Sequence[int], k: int, cutoff: float = math.inf
    ) -> tuple[list[int], float]:
        """The search's work at a node with `fixed` non-empty: the experts `inert` names, and
        `lower_bound` over the completions from the rest of `allowed`, or a weaker valid bound that
        still exceeds `cutoff` (the incumbent's value: the node is cut either way). The default
        calls both."""
        dead = self.inert(fixed, allowed, k)
        gone = set(dead)
        return dead, self.lower_bound(fixed, [x for x in allowed if x not in gone], k)

    def tail_bounds(self, fixed: Sequence[int], allowed: Sequence[int], k: int) -> Sequence[float] | None:
        """For each p, a lower bound for the node (fixed, allowed[p:]): once one exceeds the incumbent,
        the search skips the node's children from p on. The default, None, has none."""
        return None

    def twins(self) -> tuple[tuple[int, ...], ...]:
        """Groups of interchangeable experts: replacing some of a subset's members of a group by as
        many other members of it leaves value bitwise equal, at every k. The default, none, is
        always valid."""
        return ()


def _check_matrix(name: str, a: np.ndarray, shape: tuple[int, ...] | None = None) -> None:
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be an (R, E) array with R, E >= 1, got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, the gate weights {shape}")
    if not (np.all(np.isfinite(a)) and np.all(a >= 0)):
        raise ValueError(f"{name} must be finite and >= 0")


@dataclass(frozen=True, eq=False)
class GatedObjective(Objective):
    """The mean calibration loss of the gate's top-k mixture within a subset (module docstring)."""

    weights: np.ndarray
    """(R, E) the full-set gate's weights per calibration request; rows sum to 1."""
    losses: np.ndarray
    """(R, E) each expert's loss on each request's true continuation, bits per byte."""
    tokenizers: tuple[str, ...]
    """(E,) each expert's tokenizer family: only experts sharing one ensemble."""
    n_bytes: np.ndarray | None = None
    """(R,) each continuation's length in bytes, for the exact mixture; None: mix per-byte probabilities."""
    mix: Mix = "probability"
    """How a k > 1 mixture's loss is computed: "probability" (exact) or "mean_loss" (upper bound)."""

    def __post_init__(self) -> None:
        w = np.array(self.weights, dtype=np.float64)
        losses = np.array(self.losses, dtype=np.float64)
        _check_matrix("gate weights", w)
        _check_matrix("losses", losses, w.shape)
        if not np.allclose(w.sum(axis=1), 1.0, atol=1e-6):
            raise ValueError("every row of the gate weights must sum to 1")
        if len(self.tokenizers) != w.shape[1]:
            raise ValueError(f"{len(self.tokenizers)} tokenizers for {w.shape[1]} experts")
        if self.mix not in ("probability", "mean_loss"):
            raise ValueError(f"mix must be 'probability' or 'mean_loss', got {self.mix!r}")
        n_bytes = np.ones(w.shape[0]) if self.n_bytes is None else np.array(self.n_bytes, dtype=np.float64)
        if n_bytes.shape != (w.shape[0],) or not np.all(np.isfinite(n_bytes) & (n_bytes > 0)):
            raise ValueError(f"n_bytes must be ({w.shape[0]},) positive lengths, got shape {n_bytes.shape}")
        names = sorted(set(self.tokenizers))
        for name, a in (("weights", w), ("losses", losses), ("n_bytes", n_bytes)):
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        groups = np.array([names.index(t) for t in self.tokenizers])  # (E,) tokenizer id
        object.__setattr__(self, "_rk", bounds.Ranking.of(w, groups))
        object.__setattr__(self, "_twins", bounds.twins(w, losses, groups))
        object.__setattr__(self, "_losses_t", np.ascontiguousarray(losses.T))  # (E, R) for bounds.prune_k1

    @property
    def n_experts(self) -> int:
        return self.weights.shape[1]

    @property
    def n_requests(self) -> int:
        """R, the calibration requests."""
        return self.weights.shape[0]

    def request_losses(self, subset: Sequence[int], k: int) -> np.ndarray:
        """(R,) each calibration request's loss within `subset` (non-empty). The arithmetic runs on the
        chosen experts only, in gate order, so two subsets that choose the same experts for a request
        give it bitwise the same loss (the solver's `inert` rule relies on it)."""
        s = np.asarray(subset, dtype=np.intp)
        rows = np.arange(self.n_requests)[:, None]
        if k == 1:  # each request's top of S; ranks are distinct per request
            return self.losses[rows[:, 0], s[self._rk.ranks_t[s].argmin(axis=0)]]
        members = s[np.argsort(self._rk.ranks[:, s], axis=1)]  # (R, m) S in each request's gate order
        groups = self._rk.groups[members]
        same = groups == groups[:, :1]  # shares the top expert's tokenizer
        chosen = same & (np.cumsum(same, axis=1) <= k)  # (R, m) the mixture's members
        first = np.argsort(~chosen, axis=1, kind="stable")[:, :k]  # chosen ones first, in gate order
        picked = np.take_along_axis(members, first, axis=1)  # (R, c), c = min(k, m)
        valid = np.take_along_axis(chosen, first, axis=1)  # (R, c) False: padding
        return self._mixed(rows, picked, valid)

    def _mixed(self, rows: np.ndarray, picked: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(R,) the loss of each request's mixture of `picked` (R, c) where `valid`, gate-weighted."""
        w = np.where(valid, self.weights[rows, picked], 0.0)
        total = w.sum(axis=1, keepdims=True)
        w = np.where(total > 0, w / np.where(total > 0, total, 1.0), valid / valid.sum(axis=1, keepdims=True))
        losses = self.losses[rows, picked]  # (R, c)
        if self.mix == "mean_loss":
            mixed = (w * losses).sum(axis=1)
        else:
            b = self.n_bytes[:, None]
            with np.errstate(divide="ignore"):
                x = np.where(w > 0, np.log2(w) - losses * b, -np.inf)  # log2 of w_c * 2^(-L B)
            top = x.max(axis=1, keepdims=True)
            mixed = -(top[:, 0] + np.log2(np.exp2(x - top).sum(axis=1))) / b[:, 0]
        # The exact mixture is never below its best member's loss; clamping undoes rounding, so that the
        # computed value never falls below bounds.least_loss (select prunes on it without a margin).
        mixed = np.maximum(mixed, np.where(valid, losses, np.inf).min(axis=1))
        return np.where(valid.sum(axis=1) == 1, losses[:, 0], mixed)  # one member: its loss, unrounded

    def value(self, subset: Sequence[int], k: int) -> float:
        return float(self.request_losses(subset, k).mean())

    def eligible(self, fixed: Sequence[int], allowed: Sequence[int], k: int) -> np.ndarray:
        """(R, E) whether each expert can be in each request's mixture in some completion (bounds.eligible)."""
        return bounds.eligible(self._rk, fixed, allowed, k)

    def twins(self) -> tuple[tuple[int, ...], ...]:
        """Experts with the same tokenizer and bitwise the same weights and losses on every request, where
        no other expert's weight equals theirs (bounds.twins): within a subset they fill the same
        places of each request's gate order, whichever of them it holds. Computed once."""
        return self._twins

    def inert(self, fixed: Sequence[int], allowed: Sequence[int], k: int) -> list[int]:
        """The experts of `allowed` that add an expert no request uses (bounds.inert)."""
        return [x for x, dead in zip(allowed, bounds.inert(self._rk, fixed, allowed, k), strict=True) if dead]

    def prune(
        self, fixed: Sequence[int], allowed: Sequence[int], k: int, cutoff: float = math.inf
    ) -> tuple[list[int], float]:
        """At k = 1 both in one pass (bounds.prune_k1: the same experts and bound as inert and lower_bound).
        At k > 1 inert, then the bound, whose mixture part (the costly one) is skipped when the least
        loss part alone exceeds `cutoff`."""
        if k == 1:
            dead, bound = bounds.prune_k1(self._rk, self._losses_t, fixed, allowed)
            return [x for x, d in zip(allowed, dead, strict=True) if d], bound
        dead = self.inert(fixed, allowed, k)
        gone = set(dead)
        return dead, self._bound(fixed, [x for x in allowed if x not in gone], k, cutoff)

    def tail_bounds(self, fixed: Sequence[int], allowed: Sequence[int], k: int) -> Sequence[float] | None:
        """At k = 1, bounds.tail_bounds_k1; at k > 1 none."""
        return bounds.tail_bounds_k1(self._rk, self._losses_t, fixed, allowed).tolist() if k == 1 else None

    def lower_bound(self, fixed: Sequence[int], allowed: Sequence[int], k: int) -> float:
        """The mean over requests of a bound on each request's loss from its eligible experts: the least
        of their losses at k = 1, and at k > 1 the larger of that and bounds.mixture_bound."""
        return self._bound(fixed, allowed, k, math.inf)

    def _bound(self, fixed: Sequence[int], allowed: Sequence[int], k: int, cutoff: float) -> float:
        """lower_bound, or its least loss part alone where that exceeds `cutoff` (prune)."""
        ok = self.eligible(fixed, allowed, k)
        least = bounds.least_loss(ok, self.losses)  # (R,) exact against request_losses' clamp
        weak = float(least.mean())
        if k == 1 or weak > cutoff:
            return weak
        mean_loss = self.mix == "mean_loss"
        mixture = bounds.mixture_bound(self._rk, ok, fixed, self.weights, self.losses, self.n_bytes, k, mean_loss)
        # mixture_bound rounds differently from request_losses: 1e-12 (relative) below it covers that.
        return float(np.maximum(least, mixture * (1 - 1e-12)).mean())


def route(weights: Sequence[float] | np.ndarray, tokenizers: Sequence[str], subset: Sequence[int], k: int) -> tuple[
    tuple[int, ...], tuple[float, ...]
]:  # fmt: skip
    """One request's mixture within `subset` (non-empty): the experts (top first) and their renormalised
    weights. `weights` (E,) is the full-set gate's output for the request, `tokenizers` (E,) the
    experts'. Raises ValueError for an empty subset or k < 1."""
    if not subset or k < 1:
        raise ValueError(f"routing needs a non-empty subset and k >= 1, got {list(subset)}, k={k}")
    w = np.asarray(weights, dtype=np.float64)
    order = sorted(subset, key=lambda i: (-w[i], i))
    chosen = [i for i in order if tokenizers[i] == tokenizers[order[0]]][:k]
    total = float(sum(w[i] for i in chosen))
    mixed = tuple(float(w[i]) / total if total > 0 else 1.0 / len(chosen) for i in chosen)
    return tuple(chosen), mixed


def column_objective(
    weights: np.ndarray, losses: np.ndarray, tokenizers: Sequence[str], n_bytes: np.ndarray, columns: Sequence[int]
) -> GatedObjective:
    """The gated objective over experts of the variant `columns` (one per expert, repeats allowed):
    (R, V) gate weights restricted to them and renormalised (MoE²: no retraining), their (R, V)
    losses, tokenizers (V,) and the requests' (R,) bytes."""
    cols = list(columns)
    w = np.asarray(weights, dtype=np.float64)[:, cols]  # (R, E)
    return GatedObjective(w / w.sum(axis=1, keepdims=True), np.asarray(losses)[:, cols],
                          tuple(tokenizers[c] for c in cols), n_bytes)  # fmt: skip
