"""Generation: prefill, decode loop, sampling, stop conditions, streaming, batches.

A batch is left-padded: row b's prompt occupies cache slots [pad_b, P) and every row decodes at
the same slot, so one forward serves all rows. Rows finish independently; a finished row keeps
riding along (its tokens are discarded) until the whole batch is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from models.chat import render_chat
from models.errors import ContextLengthExceeded, InvalidRequest
from models.kvpred import KVReport, PredictorSet, Repair, predict_prompt
from models.sampling import SamplingParams, sample, token_logprobs
from models.skip import RouterSet, SkipReport, prefill, skip_count
from models.tokenizer import GGUFTokenizer
from models.transformer import Step, Transformer

if TYPE_CHECKING:
    from models.grammar import Constraint, Grammar

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
SCORE_CHUNK = 128
"""Positions whose logits are computed at once when scoring a prompt."""


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw distribution, and the most likely tokens'."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) of the k most likely tokens, most likely first."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row, with the text it made printable (may be "").

    A row is a prompt of the batch, or one of a prompt's `n` choices (SamplingParams.n)."""

    row: int
    token_id: int
    text: str
    finish_reason: str | None = None
    """None while generating; "eos", "stop" or "length" on the row's last event."""
    logprob: TokenLogprob | None = None
    """With SamplingParams.logprobs: this token's."""
    prompt: tuple[TokenLogprob | None, ...] = ()
    """With SamplingParams.prompt_logprobs, on a prompt's first event only: each prompt token's
    (None for the first, which nothing predicts)."""
    skipping: SkipReport | None = None
    """With SamplingParams.skip_ratio, on the row's last event: the layers skipped (models.skip)."""
    kv: KVReport | None = None
    """With SamplingParams.kv_prediction, on the row's last event: what was predicted and when the
    cache was repaired (models.kvpred)."""


@dataclass(frozen=True)
class Continuation:
    """Tokens already generated for this prompt elsewhere (a failed-over request).

    They are appended to the prompt, and the text they decode to is treated as already delivered:
    the first `chars` characters of it, exactly what the caller has received.
    """

    ids: tuple[int, ...]
    chars: int


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0


class _Detokenizer:
    """Turns a growing list of ids into text deltas, holding back partial UTF-8 and stop prefixes."""

    def __init__(self, tokenizer: GGUFTokenizer, stop: tuple[str, ...], primed: Continuation | None = None) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = list(primed.ids) if primed else []
        self.emitted = primed.chars if primed else 0  # characters already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(text, min(hits))
        end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes to U+FFFD for now
        for s in self.stop:  # hold back a tail that could still grow into a stop string
            for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                if text[end - k : end] == s[:k]:
                    end -= k
                    break
        return self._take(text, end)

    def flush(self) -> str:
        return "" if self.stopped else self._take(self.tokenizer.decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


class StepEngine(Protocol):
    """What Generator.stream_engine needs of an engine; edge_agent.engines' InferenceEngine has it."""

    def prefill(self, request_id: str, ids: Sequence[int], max_len: int) -> torch.Tensor: ...

    def decode(self, request_id: str, token: int) -> torch.Tensor: ...

    def release(self, request_id: str) -> None: ...


class Generator:
    """Generates text with one model and its tokenizer."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: GGUFTokenizer,
        routers: RouterSet | None = None,
        drafts: dict[float, Any] | None = None,
        predictors: PredictorSet | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.routers = routers
        """The model's layer-skipping routers (models.skip), for requests with a skip_ratio."""
        self.drafts = drafts if drafts is not None else {}
        """Skip ratio -> the lossless mode's draft-length state (models.speculative.DraftLength),
        kept across requests by the model's owner: what drafting costs and how often it is
        accepted carries over, so a request does not spend its first tokens measuring it."""
        self.predictors = predictors
        """The model's KV predictors (models.kvpred), for requests with a kv_prediction."""

    def encode_prompt(self, prompt: Prompt, tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Ids for a text prompt, a list of ids, or chat messages (rendered with the chat template, with
        `tools`, OpenAI tool definitions, where the template takes them)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt must not be empty")
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
        if all(isinstance(t, int) for t in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
            if not all(0 <= t < self.model.cfg.vocab_size for t in ids):
                raise InvalidRequest(f"token ids must be in [0, {self.model.cfg.vocab_size})")
            return ids
        info = self.tokenizer.info
        bos = self.tokenizer.decode([info.bos_id], skip_special_tokens=False) if info.bos_id is not None else ""
        text = render_chat(info.chat_template, prompt, bos_token=bos, tools=tools)  # type: ignore[arg-type]
        # The template writes BOS itself where the model wants one.
        return self.tokenizer.encode(text, add_bos=False)

    def stream(
        self, prompts: Sequence[Prompt], params: SamplingParams, continuations: Sequence[Continuation] | None = None
    ) -> Iterator[TokenEvent]:
        """Yield TokenEvents as tokens are produced, for every row of the batch.

        With `continuations`, row i goes on from continuations[i] (see Continuation): the result is
        the same as if one generation had produced those tokens and then these.
        """
        if not prompts:
            raise InvalidRequest("no prompts given")
        if continuations is not None and len(continuations) != len(prompts):
            raise InvalidRequest("one continuation per prompt")
        primed = list(continuations) if continuations is not None else [None] * len(prompts)
        encoded = [
            self._fits(i, self.encode_prompt(p) + list(c.ids if c else ()))
            for i, (p, c) in enumerate(zip(prompts, primed, strict=True))
        ]
        if params.kv_prediction:
            self._check_predicting(len(encoded), params)
        if params.skip_ratio:
            self._check_skipping(len(encoded), params)
            if params.lossless:
                yield from self._run_lossless(encoded[0], params, primed[0])
                return
        yield from self._run(encoded, params, primed)

    def _check_skipping(self, prompts: int, params: SamplingParams) -> None:
        """InvalidRequest unless this generator can skip layers for this request."""
        if self.routers is None:
            raise InvalidRequest(
                "this model has no layer-skipping routers (train them: tandem models train-routers); send skip_ratio 0"
            )
        if prompts != 1 or params.n != 1:
            raise InvalidRequest("layer skipping decodes one prompt and one choice (n = 1)")
        if params.lossless and (params.logprobs is not None or params.prompt_logprobs is not None or params.constraint):
            raise InvalidRequest("the lossless mode returns tokens only: no logprobs or grammar with it")
        protected = len(self.routers.for_ratio(params.skip_ratio).protected)
        ratio = self.routers.snapped(params.skip_ratio)
        skip_count(self.model.cfg.n_layers, ratio, protected)  # InvalidRequest beyond the free layers

    def _check_predicting(self, prompts: int, params: SamplingParams) -> None:
        """InvalidRequest unless this generator can predict this request's prompt cache."""
        if self.predictors is None:
            raise InvalidRequest(
                "this model has no KV predictors (train them: tandem models train-kv); send kv_prediction 0"
            )
        self.predictors.for_depth(params.kv_prediction)  # InvalidRequest naming the trained depths
        if prompts != 1:  # n and prompt logprobs: SamplingParams refuses them with kv_prediction
            raise InvalidRequest("KV prediction prefills one prompt for one choice (n = 1)")

    def _run_lossless(
        self, ids: list[int], params: SamplingParams, primed: Continuation | None
    ) -> Iterator[TokenEvent]:
        """One prompt decoded by self-speculation (models.speculative): the routed skip set drafts,
        the whole model verifies; the tokens are the whole model's."""
        from models.speculative import DraftLength, SelfSpeculative  # loaded only for such requests

        routers = self.routers
        assert routers is not None  # _check_skipping
        budget = min(params.max_tokens, self.model.cfg.context_length - len(ids))
        draft = self.drafts.setdefault(params.skip_ratio, DraftLength())
        spec = SelfSpeculative(self.model, lambda pooled: routers.choose(pooled, params.skip_ratio), params, draft)
        detok = _Detokenizer(self.tokenizer, params.stop, primed)
        eos = set() if params.ignore_eos else set(self.tokenizer.info.eos_ids)
        for produced, tok in enumerate(spec.run(ids, budget), start=1):
            ev = self._event(0, tok, detok, eos, produced == budget)
            if ev.finish_reason is not None:
                report = SkipReport(tuple(sorted(spec.skip)), True, spec.stats.drafted, spec.stats.accepted)
                yield dataclasses.replace(ev, skipping=report)
                return
            yield ev

    def _fits(self, row: int, ids: list[int]) -> list[int]:
        ctx = self.model.cfg.context_length
        if len(ids) >= ctx:
            raise ContextLengthExceeded(
                f"prompt {row} has {len(ids)} tokens; the context holds {ctx} including at least one new token"
            )
        return ids

    def stream_engine(
        self,
        engine: StepEngine,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        continuation: Continuation | None = None,
    ) -> Iterator[TokenEvent]:
        """What stream() yields for one prompt, computed by an InferenceEngine (edge_agent.engines:
        any object with prefill, decode and release) instead of this generator's model, which
        only supplies the configuration. The engine's request is released at the end."""
        if params.skip_ratio:
            raise InvalidRequest(
                f"layer skipping runs on the model's own route (the kernels), not on {type(engine).__name__}; "
                "send skip_ratio 0 or serve with the default engine"
            )
        if params.kv_prediction:
            raise InvalidRequest(
                f"KV prediction runs on the model's own route (the kernels), not on {type(engine).__name__}; "
                "send kv_prediction 0 or serve with the default engine"
            )
        ids = self._fits(0, self.encode_prompt(prompt) + list(continuation.ids if continuation else ()))
        budget = min(params.max_tokens, self.model.cfg.context_length - len(ids))
        grammar = self._grammar(params)
        scored = self.score(ids, params.prompt_logprobs) if params.prompt_logprobs is not None else ()
        generators, eos = self._decoding(params, [continuation])
        try:
            for choice in range(params.n):  # the engine keeps one state a request: each choice prefills
                detok = _Detokenizer(self.tokenizer, params.stop, continuation)
                constraint = grammar.start() if grammar is not None else None
                logits = engine.prefill(request_id, ids, len(ids) + budget)[None].float().cpu()  # (1, V)
                for t in range(budget):
                    ev = self._next(choice, logits, params, generators, detok, eos, constraint, t == budget - 1)
                    if t == 0 and choice == 0 and scored:
                        ev = dataclasses.replace(ev, prompt=scored)
                    yield ev
                    if ev.finish_reason is not None:
                        break
                    logits = engine.decode(request_id, ev.token_id)[None].float().cpu()
        finally:
            engine.release(request_id)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """Complete every prompt; returns one Completion per prompt (per choice: n of a single prompt), in order."""
        out = [Completion() for _ in range(len(prompts) * params.n)]
        for ev in self.stream(prompts, params):
            c = out[ev.row]
            c.text += ev.text
            c.token_ids.append(ev.token_id)
            c.finish_reason = ev.finish_reason or c.finish_reason
        return out

    @torch.inference_mode()
    def score(self, ids: Sequence[int], k: int = 0) -> tuple[TokenLogprob | None, ...]:
        """Each token of `ids` scored teacher-forced by this generator's model: its log-probability
        given the ones before it, and the k most likely tokens there (None for the first token).
        Runs the model's own torch forward over the whole sequence, in its own caches."""
        ids = self._fits(0, list(ids))
        self.model.setup_cache(1, len(ids))
        h = self.model.forward_layers(self.model.embed(torch.tensor([ids])), Step.at(0, len(ids)))
        return (None, *self._scores(h[0, :-1], torch.tensor(ids[1:]), k))

    def _scores(self, h: Tensor, targets: Tensor, k: int) -> list[TokenLogprob]:
        """(T, D) hidden states predicting (T,) targets -> their TokenLogprobs; the head runs over
        SCORE_CHUNK positions at a time (Gemma's 262k-token vocabulary: 1 GiB of logits a 1k prompt)."""
        out: list[TokenLogprob] = []
        for i in range(0, h.shape[0], SCORE_CHUNK):
            logits = self.model.head(h[i : i + SCORE_CHUNK])
            out += _logprobs(logits, targets[i : i + SCORE_CHUNK], k)
        return out

    def _grammar(self, params: SamplingParams) -> Grammar | None:
        """The compiled grammar `params.constraint` names (None: free text); raises InvalidRequest."""
        if not params.constraint:
            return None
        from models.grammar import compile_constraint  # its grammar library loads only for such requests

        return compile_constraint(self.tokenizer, self.model.cfg.vocab_size, params.constraint)

    @torch.inference_mode()
    def _run(
        self, encoded: list[list[int]], params: SamplingParams, primed: list[Continuation | None]
    ) -> Iterator[TokenEvent]:
        batch, longest = len(encoded), max(len(ids) for ids in encoded)
        if params.n > 1 and batch > 1:
            raise InvalidRequest("n > 1 takes a single prompt")
        budget = min(params.max_tokens, self.model.cfg.context_length - longest)
        self.model.setup_cache(batch, longest + budget)
        pad = torch.tensor([longest - len(ids) for ids in encoded], dtype=torch.long)
        tokens = torch.tensor([[0] * (longest - len(ids)) + ids for ids in encoded], dtype=torch.long)
        grammar = self._grammar(params)
        generators, eos = self._decoding(params, primed)

        skip: frozenset[int] = frozenset()
        kv: KVReport | None = None
        repair: Repair | None = None
        if params.skip_ratio and self.routers is not None:  # one prompt (_check_skipping): no padding
            h, pooled = prefill(self.model, self.model.embed(tokens), Step.at(0, longest, batch, pad))
            skip = self.routers.choose(pooled[0], params.skip_ratio)
        elif params.kv_prediction and self.predictors is not None:  # one prompt (_check_predicting)
            h, predicted = predict_prompt(self.model, self.predictors.for_depth(params.kv_prediction), tokens)
            kv = KVReport(params.kv_prediction, predicted)
            repair = Repair(self.model) if params.kv_repair and predicted else None
        else:
            h = self.model.forward_layers(self.model.embed(tokens), Step.at(0, longest, batch, pad))
        report = SkipReport(tuple(sorted(skip)), False) if params.skip_ratio else None
        sequence = list(encoded[0])  # what repair recomputes: the prompt, then each token decoded
        scored: list[tuple[TokenLogprob | None, ...]] = [()] * batch
        if params.prompt_logprobs is not None:
            scored = [
                (None, *self._scores(h[b, int(pad[b]) : -1], tokens[b, int(pad[b]) + 1 :], params.prompt_logprobs))
                for b in range(batch)
            ]
        first = self.model.head(h[:, -1])  # (B, V): only the last position is needed
        # n choices of one prompt share its prefill: each after the first restores the prompt's
        # cache slots (in place: the CPU decoder binds to the buffers) and decodes from its logits.
        caches = [c for c in self.model.caches if c is not None]
        saved = [(c.k[:, :, :longest].clone(), c.v[:, :, :longest].clone()) for c in caches] if params.n > 1 else []
        for choice in range(params.n):
            if choice:
                for c, (k, v) in zip(caches, saved, strict=True):
                    c.k[:, :, :longest] = k
                    c.v[:, :, :longest] = v
            detok = [_Detokenizer(self.tokenizer, params.stop, c) for c in primed]
            constraints = [grammar.start() if grammar is not None else None for _ in range(batch)]
            done = [False] * batch
            logits = first
            for t in range(budget):
                events = [
                    None
                    if done[b]
                    else self._next(
                        b + choice, logits[b : b + 1], params, generators and generators[b : b + 1], detok[b], eos,
                        constraints[b], t == budget - 1,
                    )
                    for b in range(batch)
                ]  # fmt: skip
                for b, ev in enumerate(events):
                    if ev is not None:
                        done[b] = ev.finish_reason is not None
                        if done[b] and report is not None:
                            ev = dataclasses.replace(ev, skipping=report)
                        if done[b] and kv is not None:
                            ev = dataclasses.replace(ev, kv=kv)
                        yield dataclasses.replace(ev, prompt=scored[b]) if t == 0 and choice == 0 and scored[b] else ev
                if all(done):
                    break
                next_ids = torch.tensor([ev.token_id if ev is not None else 0 for ev in events])
                if repair is not None:  # one row: a piece of the true cache below the slot decoded next
                    sequence.append(int(next_ids[0]))
                    if repair.before_step(sequence, longest + t):
                        kv, repair = dataclasses.replace(kv, repaired_at=t + 1), None  # type: ignore[arg-type]
                h = self.model.embed(next_ids[:, None])
                h = self.model.forward_layers(h, Step.at(longest + t, 1, batch, pad), skip=skip)
                logits = self.model.head(h[:, -1])

    def _next(
        self,
        row: int,
        logits: Tensor,
        params: SamplingParams,
        generators: list[torch.Generator] | None,
        detok: _Detokenizer,
        eos: set[int],
        constraint: Constraint | None,
        last: bool,
    ) -> TokenEvent:
        """The next token of one row from its (1, V) logits: masked by its grammar, sampled, scored
        under the raw logits, and turned into its event. A grammar that has ended stops the row."""
        raw = logits
        if constraint is not None:
            logits = constraint.mask(logits.clone())
        tok = int(sample(logits, params, generators)[0])
        lp = _logprobs(raw, torch.tensor([tok]), params.logprobs)[0] if params.logprobs is not None else None
        if constraint is not None and tok not in eos:
            constraint.accept(tok)
        ev = self._event(row, tok, detok, eos, last)
        if constraint is not None and constraint.done and ev.finish_reason is None:
            ev = TokenEvent(row, tok, ev.text + detok.flush(), "stop")
        return dataclasses.replace(ev, logprob=lp) if lp is not None else ev

    def _decoding(
        self, params: SamplingParams, primed: list[Continuation | None]
    ) -> tuple[list[torch.Generator] | None, set[int]]:
        """Per row, the seeded sampler (None: unseeded or greedy; n choices of a row draw from it in
        turn); the eos ids. Each choice takes its own detokenizer."""
        generators = None
        if not params.greedy and params.seed is not None:
            generators = [torch.Generator().manual_seed(params.seed) for _ in primed]
        return generators, set() if params.ignore_eos else set(self.tokenizer.info.eos_ids)

    @staticmethod
    def _event(row: int, tok: int, detok: _Detokenizer, eos: set[int], last: bool) -> TokenEvent:
        if tok in eos:
            return TokenEvent(row, tok, detok.flush(), "eos")
        text = detok.push(tok)
        if detok.stopped:
            return TokenEvent(row, tok, text, "stop")
        if last:
            return TokenEvent(row, tok, text + detok.flush(), "length")
        return TokenEvent(row, tok, text)


def plain(lp: TokenLogprob | None) -> tuple[int, float, tuple[tuple[int, float], ...]] | None:
    """(token id, log-probability, top) of a TokenLogprob: what the wire (tandem.wire) carries."""
    return None if lp is None else (lp.token_id, lp.logprob, lp.top)


def _logprobs(logits: Tensor, chosen: Tensor, k: int) -> list[TokenLogprob]:
    """TokenLogprobs of `chosen` (T,) under (T, V) raw logits, with the top k of each position."""
    picked, ids, values = token_logprobs(logits, chosen, k)
    return [
        TokenLogprob(int(t), float(p), tuple(zip(i, v, strict=True)))
        for t, p, i, v in zip(chosen.tolist(), picked.tolist(), ids.tolist(), values.tolist(), strict=True)
    ]
