"""One loaded model served one request at a time: the wrapper the agent and the hub's local backend share.

`ServedModel` holds the lock (requests run one at a time; others wait, and the caller counts them as
queue depth), warms the model up at construction, encodes prompts, and streams a request's tokens
from either a step engine (edge_agent.engines, through `Generator.stream_engine`) or the model's own
generator. An optional `Pacer` holds tokens back so that they arrive no sooner than a device class
being emulated would produce them; pacing can only slow a request down.

Cancellation is checked between steps: a request cancelled while it waits for the lock never starts,
one cancelled while running stops within one decode step (or at once while held back by the pacer),
and its generator's closing releases the engine's per-request state (its KV cache) under the lock.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from models.generate import Continuation, Prompt, StepEngine, TokenEvent
from models.kvpred import KVVariant
from models.loaded import LoadedModel
from models.sampling import SamplingParams
from models.skip import SkipVariant
from models.threads import GOVERNOR


@dataclass(frozen=True)
class Pace:
    """Minimum timings to emulate: the first token after ttft_ms, then one every tpot_ms."""

    ttft_ms: float
    """Earliest first token, from the request's start under the lock."""
    tpot_ms: float
    """Least time between tokens after the first."""


Pacer = Callable[[int, int, int | None], Pace]
"""(prompt tokens, max new tokens, the layers a KV-predicted prompt runs through (models.kvpred;
None: the whole model prefills it)) -> the timings to emulate."""


class ServedModel:
    """`loaded` served one request at a time, by `engine` when given (an engine that has loaded this
    model), else by the model's own generator."""

    max_concurrency: int = 1
    """Requests it runs at once (its lock lets one through): what an agent serving it advertises to
    the hub (Hello.max_concurrency) and admits to stream() at once."""
    slowdown: float = 1.0
    """Stretch every token's compute by this factor (a throttled CPU, a neighbour taking cycles): each
    token is held (slowdown - 1) x its own compute time. For tests and demos of recalibration; 1 = off."""

    def __init__(
        self,
        name: str,
        loaded: LoadedModel,
        engine: StepEngine | None = None,
        pacer: Pacer | None = None,
        warmup: bool = True,
    ) -> None:
        self.name = name
        self.loaded = loaded
        self.engine = engine
        self.pacer = pacer
        self._lock = threading.Lock()
        self._requests = itertools.count()
        self.info = loaded.describe(name)
        """The ModelInfo fields a server advertises (constant: the hub reads them per request)."""
        if warmup:
            self.warmup()

    @property
    def skip_ratios(self) -> list[float]:
        """The skip ratios requests may ask of it (the routers' on the model's own route; none
        through a step engine, which models.generate refuses skipping on)."""
        return [] if self.engine is not None else self.loaded.skip_ratios

    @property
    def skip_variants(self) -> list[SkipVariant]:
        """The layer-skipping variants requests may ask of it (models.skip.SkipVariant; none through a
        step engine, as skip_ratios)."""
        return [] if self.engine is not None else self.loaded.skip_variants

    @property
    def kv_variants(self) -> list[KVVariant]:
        """The KV-prediction variants requests may ask of it (models.kvpred.KVVariant; none
        through a step engine, which models.generate refuses KV prediction on)."""
        return [] if self.engine is not None else self.loaded.kv_variants

    def _kv_layers(self, params: SamplingParams) -> int | None:
        """The auxiliary layers this request's prompt runs through with KV prediction (None: all)."""
        p = self.loaded.predictors
        if not params.kv_prediction or p is None or self.engine is not None:
            return None
        trained = p.by_depth.get(params.kv_prediction)
        return len(trained.aux_layers) if trained is not None else None

    @property
    def lock(self) -> threading.Lock:
        """The lock that lets one request at a time use the model (a split stage holds it too)."""
        return self._lock

    def warmup(self) -> None:
        """One short generation, so the first real request does not pay for lazy initialisation."""
        for _ in self.stream([1, 2, 3, 4], SamplingParams(max_tokens=2, ignore_eos=True), threading.Event()):
            pass

    def encode(self, prompt: Prompt, tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of a prompt (text, chat messages or ids; a chat with its `tools`); raises
        models.errors.InvalidRequest."""
        return self.loaded.generator().encode_prompt(prompt, tools)

    def stream(
        self,
        ids: list[int],
        params: SamplingParams,
        cancel: threading.Event,
        continuation: Continuation | None = None,
        engine: StepEngine | None = None,
        started: Callable[[], None] | None = None,
    ) -> Iterator[TokenEvent]:
        """Tokens for prompt `ids` (going on from `continuation`), one request at a time, paced;
        `started()` is called once it holds the model (the time before that is queueing).

        Stops without a final event when `cancel` is set (see the module docstring); raises
        models.errors.InvalidRequest for a prompt the model cannot take (too long for its context).
        `engine` computes this request instead of the one it was built with (a split request's)."""
        with self._lock, GOVERNOR.computing_here():  # computing from here: threads fitted (models.threads)
            if cancel.is_set():  # cancelled while it waited: nothing computed
                return
            if started is not None:
                started()
            start = time.perf_counter()
            pace = self.pacer(len(ids), params.max_tokens, self._kv_layers(params)) if self.pacer else None
            gen = self.loaded.generator()
            engine = engine or self.engine  # a split request's engine (cloud_hub.split) stands in for this one's
            if engine is not None:
                events = gen.stream_engine(engine, f"r{next(self._requests)}", ids, params, continuation)
            else:
                events = gen.stream([ids], params, [continuation] if continuation is not None else None)
            with contextlib.closing(events):  # a cancelled request releases its engine state under the lock
                mark = start
                for i, event in enumerate(events):
                    if cancel.is_set():
                        return
                    if self.slowdown > 1:  # throttled: this token's compute again, (slowdown - 1) times over
                        now = time.perf_counter()
                        if cancel.wait((self.slowdown - 1) * (now - mark)):
                            return
                        mark = time.perf_counter()
                    if pace is not None:
                        hold = start + (pace.ttft_ms + i * pace.tpot_ms) / 1000 - time.perf_counter()
                        if hold > 0 and cancel.wait(hold):  # held back, and cancelled meanwhile
                            return
                    yield event
