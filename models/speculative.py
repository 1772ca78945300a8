"""Lossless self-speculative decoding: the model with a skip set drafts, the whole model verifies.

One round, at cache slot p with input token x (the last token emitted, not yet in the cache), k
drafted tokens (k chosen by `DraftLength` from the measured acceptance rate and costs):

  draft   k steps with the skip set (one C call each, models.skip): x at p gives d1, d1 at p+1
          gives d2, ..., d_{k-1} at p+k-1 gives dk, keeping each step's distribution q_i. Layers
          [0, s0), below the first skipped layer s0, compute exactly what the whole model computes:
          their output for each input is kept, and their KV at those slots is the whole model's.
  verify  dk through layers [0, s0), then the whole model's layers [s0, L) over the k+1 inputs x,
          d1..dk at slots p..p+k in one call from the kept hidden states (Transformer.forward_decode:
          a layer's weights read once for all k+1, each position's arithmetic exactly plain
          decode's): the whole model's distributions p_0..p_k, bit for bit, and its KV at every
          layer for those slots.
  accept  greedy: d_i while d_i == argmax p_{i-1}, then the whole model's own token where they
          first differ (or from p_k when all k are accepted). Every round emits at least one token
          and each is what greedy decoding of the whole model emits.
          sampling: the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): d_i is
          accepted with probability min(1, p(d_i) / q(d_i)); at the first rejection the token is
          drawn from max(0, p - q) renormalised; after k acceptances, from p_k. The tokens are
          distributed as the whole model's (p and q after temperature, top-k and top-p alike).

Slots past the new position keep a rejected draft's entries; attention never reads past the
position it decodes, and the next round overwrites them. Shapes: V vocabulary, D model width.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.errors import InvalidRequest
from models.sampling import SamplingParams, filter_logits
from models.skip import prefill
from models.transformer import Step, Transformer

MAX_DRAFT = 8
"""The longest draft a round may take."""


def distribution(logits: Tensor, params: SamplingParams) -> Tensor:
    """(V,) probabilities the sampler draws from for these (V,) logits (after temperature, top-k,
    top-p); greedy: one-hot on the argmax."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).float()
    return torch.softmax(filter_logits(logits.float()[None] / params.temperature, params.top_k, params.top_p)[0], -1)


@dataclass
class DraftLength:
    """Chooses each round's draft length k from the acceptance rate and costs measured so far.

    Tokens a round emits, if each draft is accepted independently with probability a:
    (1 - a^(k+1)) / (1 - a); its cost: k drafted steps + one verify pass over k+1 positions. k = 0
    is a plain decode step, chosen when drafting does not pay; every `probe` plain tokens a round
    of k = 2 measures the acceptance again."""

    fixed: int | None = None
    """Always this k (benchmarks); None: adapt."""
    max_k: int = MAX_DRAFT
    acceptance: float = 0.6
    """Running estimate of the per-token acceptance rate."""
    draft_ms: float = 0.0
    step_ms: float = 0.0
    verify_ms: dict[int, float] = field(default_factory=dict)
    """Positions -> running cost of a verify pass over that many."""
    probe: int = 32
    plain_since: int = 0

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self.step_ms:
            return 0  # measure a plain step first: the cost drafting must beat
        if not self.draft_ms or self.plain_since >= self.probe:
            return min(2, self.max_k)
        best, best_rate = 0, 1.0 / self.step_ms
        for k in range(1, self.max_k + 1):
            a = min(self.acceptance, 0.999)
            tokens = (1 - a ** (k + 1)) / (1 - a)
            rate = tokens / (k * self.draft_ms + self._verify(k + 1))
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def _verify(self, positions: int) -> float:
        """A verify pass's cost: measured at that width, else scaled from the nearest one measured."""
        if positions in self.verify_ms:
            return self.verify_ms[positions]
        if not self.verify_ms:
            return self.step_ms * (1 + 0.25 * (positions - 1))
        near = min(self.verify_ms, key=lambda n: abs(n - positions))
        return self.verify_ms[near] * (1 + 0.25 * (positions - near) / max(near, 1))

    def record(self, k: int, accepted: int, draft_ms: float, verify_ms: float) -> None:
        self.plain_since = 0
        self.acceptance = 0.8 * self.acceptance + 0.2 * (accepted / k)
        self.draft_ms = _ema(self.draft_ms, draft_ms / k)
        self.verify_ms[k + 1] = _ema(self.verify_ms.get(k + 1, 0.0), verify_ms)

    def record_plain(self, ms: float) -> None:
        self.plain_since += 1
        self.step_ms = _ema(self.step_ms, ms)


def _ema(old: float, new: float) -> float:
    return new if not old else 0.8 * old + 0.2 * new


@dataclass
class SpecStats:
    """What a lossless decode did."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    plain: int = 0
    """Tokens decoded by a plain step (k = 0)."""
    ks: list[int] = field(default_factory=list)
    """Every step's k, in order (0: a plain step)."""

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class SelfSpeculative:
    """Lossless decoding of one sequence with `model` and its skip set."""

    def __init__(
        self,
        model: Transformer,
        skip: frozenset[int] | Callable[[Tensor], frozenset[int]],
        params: SamplingParams,
        draft: DraftLength | None = None,
    ) -> None:
        """skip: the draft's skip set, or a router that picks it from the prompt's pooled layer
        inputs (L, D) (models.skip.Routers.choose), read during a layer-by-layer prefill."""
        self.route = skip if callable(skip) else None
        if not callable(skip):
            self._check(skip, model)
        self.model, self.skip, self.params = model, frozenset() if callable(skip) else frozenset(skip), params
        self.draft = draft or DraftLength()
        lengths = (self.draft.max_k, self.draft.max_k if self.draft.fixed is None else self.draft.fixed)
        if not all(isinstance(k, int) and 0 <= k <= MAX_DRAFT for k in lengths):
            raise InvalidRequest(f"a draft length must be in [0, {MAX_DRAFT}]")
        self.first = min(self.skip) if self.skip else 0
        """s0: layers below it run identically in the draft and the whole model."""
        self.stats = SpecStats()
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    @staticmethod
    def _check(skip: frozenset[int], model: Transformer) -> None:
        if not skip:
            raise InvalidRequest("the lossless mode drafts with a skip set; this request's is empty")
        if not all(0 <= i < model.cfg.n_layers for i in skip):
            raise InvalidRequest(f"skip names layers outside [0, {model.cfg.n_layers})")

    def _draw(self, probs: Tensor) -> int:
        if self.params.greedy:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _lower(self, token: int, slot: int) -> Tensor:
        """Layers [0, s0) on one token at `slot`: (1, 1, D)."""
        return self.model.forward_layers(self.model.embed(torch.tensor([[token]])), Step.at(slot, 1), 0, self.first)

    @torch.inference_mode()
    def run(self, prompt: Sequence[int], max_tokens: int) -> Iterator[int]:
        """Token ids after `prompt`, up to `max_tokens` (the caller stops early at its stop
        conditions). The cache is set up here, with room for a whole draft past the last token."""
        model, L = self.model, self.model.cfg.n_layers
        P = len(prompt)
        if P + max_tokens > model.cfg.context_length:
            raise InvalidRequest(f"{P} prompt tokens and {max_tokens} new ones exceed the context")
        model.setup_cache(1, P + max_tokens + MAX_DRAFT + 1)
        if self.route is not None:  # the router reads each layer's input during the prefill
            h, pooled = prefill(model, model.embed(torch.tensor([list(prompt)])), Step.at(0, P))
            self.skip = frozenset(self.route(pooled[0]))
            self._check(self.skip, model)
            self.first = min(self.skip)
        else:
            h = model.forward_layers(model.embed(torch.tensor([list(prompt)])), Step.at(0, P))
        x = self._draw(distribution(model.head(h[0, -1]), self.params))
        yield x
        emitted, slot = 1, P  # x goes into `slot` next
        while emitted < max_tokens:
            k = min(self.draft.choose(), max_tokens - emitted - 1)
            if k <= 0:
                t0 = time.perf_counter()
                h = model.forward_layers(model.embed(torch.tensor([[x]])), Step.at(slot, 1))
                x = self._draw(distribution(model.head(h[0, -1]), self.params))
                self.draft.record_plain((time.perf_counter() - t0) * 1000)
                self.stats.plain += 1
                self.stats.ks.append(0)
                slot, emitted = slot + 1, emitted + 1
                yield x
                continue
            out = self._round(x, slot, k, L)
            yield from out
            emitted += len(out)
            slot += len(out)
            x = out[-1]

    def _round(self, x: int, slot: int, k: int, L: int) -> list[int]:
        """One draft-and-verify round from input x at `slot`: the tokens it emits (1 to k+1)."""
        model = self.model
        t0 = time.perf_counter()
        lowers, drafts, qs = [], [], []
        token = x
        for i in range(k):
            low = self._lower(token, slot + i)  # (1, 1, D): also the whole model's
            lowers.append(low)
            h = model.forward_layers(low, Step.at(slot + i, 1), self.first, L, skip=self.skip)
            q = distribution(model.head(h[0, -1]), self.params)
            token = self._draw(q)
            drafts.append(token)
            qs.append(q)
        t1 = time.perf_counter()
        lowers.append(self._lower(drafts[-1], slot + k))
        # The whole model's layers from s0 on, over the k+1 positions in one call, each position's
        # arithmetic exactly plain decode's (Transformer.forward_decode), and the head a row at a
        # time as decode runs it: the verified tokens are bit for bit what plain decode emits.
        h = model.forward_decode(torch.cat(lowers, 1), slot, self.first, L)  # (1, k+1, D)
        ps = [distribution(model.head(h[:, t])[0], self.params) for t in range(k + 1)]
        t2 = time.perf_counter()
        out: list[int] = []
        for i, d in enumerate(drafts):
            p, q = ps[i], qs[i]
            if self.params.greedy:
                ok = d == int(p.argmax())
            else:
                ok = self._uniform() < min(1.0, float(p[d]) / max(float(q[d]), 1e-30))
            if ok:
                out.append(d)
                continue
            residual = (p - q).clamp(min=0) if not self.params.greedy else p
            total = float(residual.sum())
            out.append(self._draw(residual / total if total > 0 else p))
            break
        else:
            out.append(self._draw(ps[k]))
        accepted = len(out) - 1  # j accepted drafts and one token of the whole model's
        self.stats.drafted += k
        self.stats.accepted += accepted
        self.stats.rounds += 1
        self.stats.ks.append(k)
        self.draft.record(k, accepted, (t1 - t0) * 1000, (t2 - t1) * 1000)
        return out


__all__ = ["MAX_DRAFT", "DraftLength", "SelfSpeculative", "SpecStats", "distribution"]
