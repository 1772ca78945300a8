"""Generation: prefill, decode loop, sampling, stop conditions, streaming, batches.

A batch is left-padded: row b's prompt occupies cache slots [pad_b, P) and every row decodes at
the same slot, so one forward serves all rows. Rows finish independently; a finished row keeps
riding along (its tokens are discarded) until the whole batch is done.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from models.chat import render_chat
from models.errors import ContextLengthExceeded, InvalidRequest
from models.sampling import SamplingParams, sample
from models.tokenizer import GGUFTokenizer
from models.transformer import Step, Transformer

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row, with the text it made printable (may be "")."""

    row: int
    token_id: int
    text: str
    finish_reason: str | None = None
    """None while generating; "eos", "stop" or "length" on the row's last event."""


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

    def __init__(self, model: Transformer, tokenizer: GGUFTokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Ids for a text prompt, a list of ids, or chat messages (rendered with the chat template)."""
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
        text = render_chat(info.chat_template, prompt, bos_token=bos)  # type: ignore[arg-type]
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
        yield from self._run(encoded, params, primed)

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
        ids = self._fits(0, self.encode_prompt(prompt) + list(continuation.ids if continuation else ()))
        budget = min(params.max_tokens, self.model.cfg.context_length - len(ids))
        generators, (detok,), eos = self._decoding(params, [continuation])
        try:
            logits = engine.prefill(request_id, ids, len(ids) + budget)  # (V,), on the engine's device
            for t in range(budget):
                tok = int(sample(logits[None].float().cpu(), params, generators)[0])
                ev = self._event(0, tok, detok, eos, last=t == budget - 1)
                yield ev
                if ev.finish_reason is not None:
                    return
                logits = engine.decode(request_id, tok)
        finally:
            engine.release(request_id)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """Complete every prompt; returns one Completion per prompt, in order."""
        out = [Completion() for _ in prompts]
        for ev in self.stream(prompts, params):
            c = out[ev.row]
            c.text += ev.text
            c.token_ids.append(ev.token_id)
            c.finish_reason = ev.finish_reason or c.finish_reason
        return out

    @torch.inference_mode()
    def _run(
        self, encoded: list[list[int]], params: SamplingParams, primed: list[Continuation | None]
    ) -> Iterator[TokenEvent]:
        batch, longest = len(encoded), max(len(ids) for ids in encoded)
        budget = min(params.max_tokens, self.model.cfg.context_length - longest)
        self.model.setup_cache(batch, longest + budget)
        pad = torch.tensor([longest - len(ids) for ids in encoded], dtype=torch.long)
        tokens = torch.tensor([[0] * (longest - len(ids)) + ids for ids in encoded], dtype=torch.long)
        generators, detok, eos = self._decoding(params, primed)
        done = [False] * batch

        h = self.model.forward_layers(self.model.embed(tokens), Step.at(0, longest, batch, pad))
        logits = self.model.head(h[:, -1])  # (B, V): only the last position is needed
        for t in range(budget):
            next_ids = sample(logits, params, generators)
            for row, tok in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                ev = self._event(row, tok, detok[row], eos, last=t == budget - 1)
                done[row] = ev.finish_reason is not None
                yield ev
            if all(done):
                return
            h = self.model.embed(next_ids[:, None])
            h = self.model.forward_layers(h, Step.at(longest + t, 1, batch, pad))
            logits = self.model.head(h[:, -1])

    def _decoding(
        self, params: SamplingParams, primed: list[Continuation | None]
    ) -> tuple[list[torch.Generator] | None, list[_Detokenizer], set[int]]:
        """Per row: the seeded sampler (None: unseeded or greedy) and the detokenizer; the eos ids."""
        generators = None
        if not params.greedy and params.seed is not None:
            generators = [torch.Generator().manual_seed(params.seed) for _ in primed]
        detok = [_Detokenizer(self.tokenizer, params.stop, c) for c in primed]
        return generators, detok, set() if params.ignore_eos else set(self.tokenizer.info.eos_ids)

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
