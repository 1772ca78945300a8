"""What branch and bound needs from the gated objective: which experts a request can still use, which
experts can never be in an optimum, which are interchangeable (twins), and a lower bound on the loss
of any completion (`prune_k1`: the k = 1 rules in one pass, the search's hot path).

A search node is (fixed, allowed): every subset T with fixed ⊆ T ⊆ fixed ∪ allowed is a completion.
A request r's mixture within T (objective.py): T's top expert h by the gate, then up to k - 1 more
of T sharing h's tokenizer, in gate order. Ranks are strict (ties broken by index), so "outranks" is
a total order per request. Shapes: R requests, E experts, Eg experts of one tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Ranking:
    """The gate's order per request, and the tokenizer groups, computed once per objective."""

    ranks: np.ndarray
    """(R, E) each expert's position in its request's gate order (weight descending, index ascending)."""
    groups: np.ndarray
    """(E,) each expert's tokenizer id."""
    members: tuple[np.ndarray, ...]
    """Per tokenizer id, (R, Eg) its experts in each request's gate order."""
    ranks_t: np.ndarray
    """(E, R) `ranks` transposed, contiguous: a set of experts' ranks is a gather of rows (fast)."""

    @staticmethod
    def of(weights: np.ndarray, groups: np.ndarray) -> Ranking:
        order = np.argsort(-weights, axis=1, kind="stable")  # (R, E) expert indices, gate order
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(weights.shape[1])[None, :], axis=1)
        members = tuple(order[np.isin(order, np.flatnonzero(groups == g))].reshape(len(order), -1) for g in
                        range(groups.max() + 1))  # fmt: skip
        return Ranking(ranks, groups, members, np.ascontiguousarray(ranks.T))


def twins(weights: np.ndarray, losses: np.ndarray, groups: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """Groups (indices ascending) of two or more experts with the same tokenizer and bitwise equal
    weight and loss columns (R,), where no other expert's weight equals theirs on any request. Ties
    break by index, so such a group fills a block of consecutive places in every request's gate
    order: a subset holding m of them uses the same weights and losses, whichever m they are."""
    by_key: dict[tuple[int, bytes, bytes], list[int]] = {}
    for e in range(weights.shape[1]):
        by_key.setdefault((int(groups[e]), weights[:, e].tobytes(), losses[:, e].tobytes()), []).append(e)
    out = []
    for members in by_key.values():
        alone = (weights == weights[:, members[:1]]).sum(axis=1) == len(members)  # (R,) no outsider ties
        if len(members) > 1 and alone.all():
            out.append(tuple(members))
    return tuple(out)


def _mask(n: int, indices: Sequence[int]) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[list(indices)] = True
    return out


def eligible(rk: Ranking, fixed: Sequence[int], allowed: Sequence[int], k: int) -> np.ndarray:
    """(R, E) whether expert e can be in request r's mixture in some completion. Necessary conditions:
    e is in fixed ∪ allowed; fewer than k of fixed's experts sharing e's tokenizer outrank e (rank at
    most the k-th best of theirs); the best of the union sharing e's tokenizer outranks fixed's experts
    of other tokenizers (T's top shares e's tokenizer); at k = 1, e outranks all of fixed (e is T's top)."""
    n = len(rk.groups)
    f, u = _mask(n, fixed), _mask(n, [*fixed, *allowed])
    ranks = rk.ranks
    if k == 1:
        best_f = np.where(f, ranks, n).min(axis=1)  # (R,) fixed's top; n when fixed is empty
        return u[None, :] & (ranks <= best_f[:, None])
    out = np.zeros(ranks.shape, dtype=bool)
    for g in range(len(rk.members)):
        mine = rk.groups == g
        cols = u & mine
        if not cols.any():
            continue
        fg = f & mine
        kth = np.partition(ranks[:, fg], k - 1, axis=1)[:, k - 1] if fg.sum() >= k else np.full(len(ranks), n)
        best_u = np.where(cols, ranks, n).min(axis=1)
        best_other = np.where(f & ~mine, ranks, n).min(axis=1)
        out[:, cols] = (ranks[:, cols] <= kth[:, None]) & (best_u < best_other)[:, None]
    return out


def inert(rk: Ranking, fixed: Sequence[int], allowed: Sequence[int], k: int) -> np.ndarray:
    """Mask over `allowed`: x such that fixed ∪ {x} holds an expert no request uses in any superset
    (on every request, k experts of its tokenizer outrank it there; at k = 1, any one expert).
    Removing an unused expert changes no request's mixture, so the superset without it is as good
    and smaller: no optimum holds fixed ∪ {x}. Expects no such expert in `fixed` itself."""
    a = np.asarray(allowed, dtype=np.intp)
    if not fixed:
        return np.zeros(len(a), dtype=bool)
    ranks = rk.ranks
    if k == 1:
        r_f = ranks[:, list(fixed)]  # (R, |F|)
        top = r_f.argmin(axis=1)  # (R,) which of fixed tops each request
        beats = ranks[:, a] < r_f[np.arange(len(r_f)), top][:, None]  # (R, |A|) x outranks fixed's top
        out = ~beats.any(axis=0)  # x never tops a request
        for i in range(len(fixed)):
            rows = top == i
            if rows.any():
                out |= beats[rows].all(axis=0)  # x outranks f wherever f tops
        return out
    out = np.zeros(len(a), dtype=bool)
    for g in range(len(rk.members)):
        cols = rk.groups[a] == g
        fg = [f for f in fixed if rk.groups[f] == g]
        if not fg or not cols.any():
            continue
        r_fg, r_a = ranks[:, fg], ranks[:, a[cols]]  # (R, |Fg|), (R, |Ag|)
        if len(fg) >= k:
            kth = np.partition(r_fg, k - 1, axis=1)[:, k - 1]
            out[cols] |= (r_a > kth[:, None]).all(axis=0)  # k of fixed above x everywhere
        above = np.argsort(np.argsort(r_fg, axis=1), axis=1)  # (R, |Fg|) how many of Fg outrank each
        for i in range(len(fg)):
            if (above[:, i] < k - 1).any():
                continue  # one more expert above it leaves it in the top k somewhere
            rows = above[:, i] == k - 1  # where it is k-th of its tokenizer: x must outrank it there
            out[cols] |= (r_a[rows] < r_fg[rows, i : i + 1]).all(axis=0)
    return out


def prune_k1(rk: Ranking, losses_t: np.ndarray, fixed: Sequence[int], allowed: Sequence[int]) -> tuple[
    np.ndarray, float
]:  # fmt: skip
    """At k = 1, `inert`'s mask over `allowed` and the bound GatedObjective.lower_bound gives for the
    completions from the rest (bitwise), in one pass over the (|A|, R) ranks of `allowed` (the
    search's hot path). A request's answer is its top in T: fixed's top f, or an allowed x that
    outranks f there (`beats`). `losses_t` (E, R) is the losses transposed. Expects `fixed` non-empty."""
    a, f = np.asarray(allowed, dtype=np.intp), np.asarray(fixed, dtype=np.intp)
    r_f = rk.ranks_t[f]  # (|F|, R)
    top = r_f.argmin(axis=0)  # (R,) which of fixed tops each request
    beats = rk.ranks_t[a] < r_f.min(axis=0)  # (|A|, R) x outranks fixed's top
    # Requests grouped by their top (columns sorted by it): x makes f unused when it beats f's top on
    # every request of f's group, i.e. the group's "x does not beat it" is all False.
    perm = np.argsort(top, kind="stable")
    cut = np.flatnonzero(np.diff(top[perm])) + 1  # group starts after the first; no group is empty
    spared = np.logical_or.reduceat(~beats[:, perm], np.concatenate([[0], cut]), axis=1)  # (|A|, groups)
    dead = ~beats.any(axis=1) | ~spared.all(axis=1)  # never tops a request, or leaves some f unused
    least = losses_t[f[top], np.arange(len(top))]
    # (R,) the least loss of a request's possible answers: fixed's top, or a live x that beats it
    least = np.minimum(least, np.where(beats & ~dead[:, None], losses_t[a], np.inf).min(axis=0))
    return dead, float(least.mean())


def tail_bounds_k1(rk: Ranking, losses_t: np.ndarray, fixed: Sequence[int], allowed: Sequence[int]) -> np.ndarray:
    """(|A|,) at k = 1, for each p a lower bound for the node (fixed, allowed[p:]): the mean over
    requests of the least loss among fixed's top and the experts of allowed[p:] that outrank it.
    A row's mean may be summed in another order than a (R,) mean's: 1e-12 (relative) below covers that."""
    a = np.asarray(allowed, dtype=np.intp)
    if len(fixed):
        f = np.asarray(fixed, dtype=np.intp)
        r_f = rk.ranks_t[f]  # (|F|, R)
        top = r_f.argmin(axis=0)  # (R,)
        least_f = losses_t[f[top], np.arange(len(top))]  # (R,) fixed's top's loss
        possible = np.where(rk.ranks_t[a] < r_f.min(axis=0), losses_t[a], np.inf)  # (|A|, R)
    else:
        least_f, possible = np.inf, losses_t[a]
    suffix = np.minimum.accumulate(possible[::-1], axis=0)[::-1]  # (|A|, R) least over allowed[p:]
    return np.minimum(suffix, least_f).mean(axis=1) * (1 - 1e-12)


def least_loss(ok: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """(R,) the least loss among each request's eligible experts: a mixture's loss is at least its
    best member's (both mixing formulas), so this bounds every completion."""
    return np.where(ok, losses, np.inf).min(axis=1)


def _shift(a: np.ndarray, fill: float | int) -> np.ndarray:
    """(R, Eg) a[:, i + 1], `fill` past the end."""
    return np.concatenate([a[:, 1:], np.full((len(a), 1), fill, dtype=a.dtype)], axis=1)


def mixture_bound(
    rk: Ranking, ok: np.ndarray, fixed: Sequence[int], weights: np.ndarray, losses: np.ndarray, n_bytes: np.ndarray,
    k: int, mean_loss: bool,
) -> np.ndarray:  # fmt: skip
    """(R,) a lower bound on each request's mixture loss (k > 1) in any completion. The mixture's top h
    is an eligible expert outranking all of fixed. Its renormalised weight is at least
    w = W_h / (W_h + the weights of the k - 1 next eligible experts of its tokenizer below it) (1/k when
    W_h is 0); its partners rank below it, so their losses are at least Lb, the least eligible loss of
    its tokenizer below it. With L_m = min(L_h, Lb), the mixture is worst at that weight:
    probability: L_m - log2(w 2^(-(L_h - L_m) B) + 1 - w) / B;  mean_loss: w L_h + (1 - w) L_m."""
    rows = np.arange(len(ok))[:, None]
    n = len(rk.groups)
    best_f = np.where(_mask(n, fixed), rk.ranks, n).min(axis=1)  # (R,) fixed's top
    out = np.full(len(ok), np.inf)
    somewhere = ok.any(axis=0)  # (E,) experts eligible on some request: the others change nothing below
    for m in rk.members:  # (R, Eg) one tokenizer's experts in gate order
        m = m[somewhere[m]].reshape(len(m), -1)  # (R, Eg') the same experts on every row, in gate order
        if m.shape[1] == 0:
            continue
        ok_s = ok[rows, m]
        w = np.where(ok_s, weights[rows, m], 0.0)
        loss = np.where(ok_s, losses[rows, m], np.inf)
        eg = m.shape[1]
        pos = np.where(ok_s, np.arange(eg)[None, :], eg)
        nxt = _shift(np.minimum.accumulate(pos[:, ::-1], axis=1)[:, ::-1], eg)  # (R, Eg) next eligible
        w_pad = np.concatenate([w, np.zeros((len(w), 1))], axis=1)
        nxt_pad = np.concatenate([nxt, np.full((len(w), 1), eg)], axis=1)
        partners, at = np.zeros_like(w), nxt
        for _ in range(k - 1):
            partners += np.take_along_axis(w_pad, at, axis=1)
            at = np.take_along_axis(nxt_pad, at, axis=1)
        below = _shift(np.minimum.accumulate(loss[:, ::-1], axis=1)[:, ::-1], np.inf)
        with np.errstate(invalid="ignore", divide="ignore"):
            top = np.where(w > 0, w / (w + partners), 1.0 / k)
            floor = np.minimum(loss, below)
            if mean_loss:
                bound = top * loss + (1 - top) * floor
            else:
                b = n_bytes[:, None]
                bound = floor - np.log2(top * np.exp2(-(loss - floor) * b) + (1 - top)) / b
        tops = ok_s & (rk.ranks[rows, m] <= best_f[:, None])
        out = np.minimum(out, np.where(tops, bound, np.inf).min(axis=1))
    return out
