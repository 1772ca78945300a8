"""Sampling parameters and the choice of the next token from logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.errors import InvalidRequest

MAX_TOKENS_LIMIT = 1 << 20  # far beyond any context we run; rejects absurd requests early
MAX_LOGPROBS = 20
"""Most alternatives a token's logprobs may list (OpenAI's top_logprobs limit, vLLM's default)."""
MAX_SKIP_RATIO = 0.75
"""The largest share of a model's layers a request's decode may skip (models.skip)."""
MAX_CHOICES = 128
"""Most choices one request may ask for; a hub sets its own lower limit (cloud_hub.hub_requests.Limits.max_n)."""
KV_DEPTHS = (0.25, 0.5, 0.75)
"""The auxiliary depths KV prediction trains for (models.kvpred): shares of the base's layers."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction (InvalidRequest)."""

    max_tokens: int = 64
    """Most new tokens to generate."""
    temperature: float = 0.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; 1 keeps all."""
    seed: int | None = None
    """Seed of the sampler's generator; the same seed gives the same tokens."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Strings that end generation; the text returned stops before them."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (for benchmarks)."""
    n: int = 1
    """Choices to generate for the prompt; they share its prefill (models.generate)."""
    logprobs: int | None = None
    """None: no logprobs. k >= 0: each generated token's log-probability under the model (its raw
    distribution: before temperature, top-k/top-p and any grammar mask) and the k most likely tokens'."""
    prompt_logprobs: int | None = None
    """The same for the prompt's tokens, teacher-forced (OpenAI's `echo` with `logprobs`); the first
    token has none."""
    constraint: str = ""
    """A grammar the output must follow, as JSON (models.grammar.compile_constraint): OpenAI's
    `{"response_format": {...}}` or `{"tools": [...], "tool_choice": ...}`; "" = free text."""
    skip_ratio: float = 0.0
    """Early layer skipping (models.skip): the share of layers decode skips, chosen per request by
    the model's routers from the prompt's full-depth prefill; 0 = every layer."""
    lossless: bool = False
    """With skip_ratio: the skipping model only drafts, and the whole model verifies every token
    (models.speculative): the output is the whole model's."""
    kv_prediction: float = 0.0
    """KV prediction (models.kvpred): the prompt runs through an auxiliary model of this share of
    the layers (KV_DEPTHS), linear predictors fill every layer's cache from it, and the whole model
    takes only the prompt's last token; 0 = the whole model prefills the prompt."""
    kv_repair: bool = False
    """With kv_prediction: between decode steps the whole model recomputes the true cache a piece at
    a time and swaps it in, so the answer converges to the whole model's."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        checks = [
            (
                isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= MAX_TOKENS_LIMIT,
                f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens!r}",
            ),
            (
                _finite(self.temperature) and 0.0 <= self.temperature <= 100.0,
                f"temperature must be in [0, 100], got {self.temperature!r}",
            ),
            (
                isinstance(self.top_k, int) and self.top_k >= 0,
                f"top_k must be a non-negative integer, got {self.top_k!r}",
            ),
            (_finite(self.top_p) and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (
                isinstance(self.n, int) and 1 <= self.n <= MAX_CHOICES,
                f"n must be an integer in [1, {MAX_CHOICES}], got {self.n!r}",
            ),
            (_count(self.logprobs), f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"),
            (
                _count(self.prompt_logprobs),
                f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}",
            ),
            (isinstance(self.constraint, str), "constraint must be a JSON string"),
            (
                _finite(self.skip_ratio) and 0.0 <= self.skip_ratio <= MAX_SKIP_RATIO,
                f"skip_ratio must be in [0, {MAX_SKIP_RATIO}], got {self.skip_ratio!r}",
            ),
            (
                not self.lossless or self.skip_ratio > 0,
                "lossless drafts with the layers skip_ratio skips: set skip_ratio > 0 with it",
            ),
            (
                self.kv_prediction == 0 or (_finite(self.kv_prediction) and self.kv_prediction in KV_DEPTHS),
                f"kv_prediction must be 0 or an auxiliary depth in {list(KV_DEPTHS)}, got {self.kv_prediction!r}",
            ),
            (not self.kv_repair or self.kv_prediction > 0, "kv_repair repairs a predicted cache: set kv_prediction"),
            (
                not (self.kv_prediction and self.skip_ratio),
                "kv_prediction and skip_ratio are one at a time: send one of them",
            ),
            (not (self.kv_prediction and self.n != 1), "KV prediction prefills one prompt for one choice (n = 1)"),
            (
                not (self.kv_prediction and self.prompt_logprobs is not None),
                "prompt logprobs need the whole model's prefill: send kv_prediction 0 with them",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _count(k: object) -> bool:
    """None, or a logprobs count in [0, MAX_LOGPROBS]."""
    return k is None or (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= MAX_LOGPROBS)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """(B, V) logits with tokens outside top-k / top-p set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample(logits: Tensor, params: SamplingParams, generators: list[torch.Generator] | None) -> Tensor:
    """(B, V) logits -> (B,) next token ids. Each row draws from its own generator."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat(
        [torch.multinomial(p[None], 1, generator=g).squeeze(-1) for p, g in zip(probs, generators, strict=True)]
    )


def token_logprobs(logits: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities under the raw (T, V) logits: of `chosen` (T,) ids, (T,); and the k most
    likely ids and their log-probabilities, each (T, k). In float32 whatever the logits' dtype."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, chosen[:, None].long())[:, 0]
    if k:
        top = torch.topk(logp, k, dim=-1)
        return picked, top.indices, top.values
    empty = torch.empty(logits.shape[0], 0)
    return picked, empty.long(), empty
