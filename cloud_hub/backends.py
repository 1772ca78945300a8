"""Serving backends: how the hub runs a model itself (the cloud side of a placement).

`ServingBackend` is the plug-in point; `BACKENDS` maps a name to "module:Class", imported when
used. `local` runs our own runtime in the hub process; an OpenAI-compatible upstream (vLLM,
llama.cpp server, TGI) is the production-hub issue's addition.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from models.errors import InvalidRequest
from models.generate import Continuation, Prompt, StepEngine, plain
from models.kvpred import KVReport
from models.sampling import SamplingParams
from models.serving import ServedModel
from models.skip import SkipReport
from models.streaming import iterate_in_thread
from models.threads import GOVERNOR, fitted
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import Logprob, kv_variant_message, skip_variant_message

log = logging.getLogger("tandem.hub")

BACKENDS: dict[str, str] = {
    "local": "cloud_hub.backends:LocalModelBackend",
    "openai": "cloud_hub.upstream:OpenAIUpstreamBackend",
}


@dataclass(frozen=True)
class Piece:
    """One streamed piece of a backend's answer: usually one token."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    tokens: int = 1
    """Tokens this piece stands for (0 for a closing frame that only carries the finish reason)."""
    index: int = 0
    """The choice (SamplingParams.n)."""
    logprobs: tuple[Logprob, ...] = ()
    prompt_logprobs: tuple[Logprob | None, ...] = ()
    prompt_ids: tuple[int, ...] = ()
    skipping: SkipReport | None = None
    """On the last piece of a request with SamplingParams.skip_ratio: the layers it skipped (models.skip)."""
    kv: KVReport | None = None
    """On the last piece of a request with SamplingParams.kv_prediction: what was predicted (models.kvpred)."""
    queued_s: float | None = None
    """On the first piece: how long the request waited for the model (others ahead of it) before it
    computed; None where the backend cannot tell (an upstream server)."""


class ServingBackend(ABC):
    model: str
    """Zoo name of the model served."""

    @abstractmethod
    def model_info(self) -> pb.ModelInfo: ...

    @abstractmethod
    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt (a chat with its tool definitions); raises models.errors.InvalidRequest."""

    @abstractmethod
    def stream(
        self, ids: list[int], params: SamplingParams, continuation: Continuation | None = None
    ) -> AsyncIterator[Piece]:
        """Pieces for prompt ids, going on from `continuation` (failover) when given."""


class LocalModelBackend(ServingBackend):
    """Our runtime in the hub process, one request at a time (models.serving.ServedModel, as agents
    serve theirs), at precision `quant` (models.runtime.QUANTS): by default "source", each tensor
    at its GGUF's own precision on the CPU kernels, as agents serve theirs by default."""

    def __init__(self, model: str, quant: str = "source") -> None:
        """Raises models.errors.InvalidRequest for a quant the model cannot be served at."""
        from models.runtime import load  # torch and the weights: only a hub serving a model itself pays

        self.model = model
        GOVERNOR.start()  # its first look at the machine now, not inside the first request's lock
        loaded = load(model, quant=quant)
        try:  # routers trained for the model as served, as an agent finds its own
            loaded.attach_routers(model)
        except InvalidRequest as exc:  # unusable: served without layer skipping (and such requests refused)
            log.warning("no layer skipping on the hub's %s: %s", model, exc)
        try:  # likewise its KV predictors (models.kvpred)
            log.info("the hub's %s: %s", model, loaded.attach_predictors(model))
        except InvalidRequest as exc:
            log.warning("no KV prediction on the hub's %s: %s", model, exc)
        self.served = ServedModel(model, loaded)  # warms up: the first request pays no lazy set-up
        self._info = pb.ModelInfo(  # the router reads it
            **self.served.info,
            skip_ratios=self.served.skip_ratios,
            kv_variants=[kv_variant_message(**vars(v)) for v in self.served.kv_variants],
            skip_variants=[skip_variant_message(**vars(v)) for v in self.served.skip_variants],
        )

    def model_info(self) -> pb.ModelInfo:
        return self._info

    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> list[int]:
        return self.served.encode(prompt, tools)

    async def stream(
        self,
        ids: list[int],
        params: SamplingParams,
        continuation: Continuation | None = None,
        engine: StepEngine | None = None,
    ) -> AsyncIterator[Piece]:
        """Pieces for prompt ids; `engine` computes them instead of this model (a split request's
        cloud_hub.split.SplitEngine, which runs this model's share of the layers): the sampling,
        stop strings and detokenizing are this model's either way."""
        cancel = threading.Event()
        called, began = time.perf_counter(), [0.0]  # began: when it got the model (ServedModel.stream's lock)
        run = lambda: self.served.stream(  # noqa: E731
            ids, params, cancel, continuation, engine, started=lambda: began.__setitem__(0, time.perf_counter())
        )
        first = True
        async for ev in iterate_in_thread(fitted(run), cancel):
            queued = max(0.0, began[0] - called) if first else None
            first = False
            if ev.logprob is None and not ev.prompt and not ev.row:
                yield Piece(ev.text, (ev.token_id,), ev.finish_reason, skipping=ev.skipping, kv=ev.kv, queued_s=queued)
                continue
            logprobs = (plain(ev.logprob),) if ev.logprob is not None else ()
            prompt = tuple(plain(p) for p in ev.prompt)
            yield Piece(
                ev.text, (ev.token_id,), ev.finish_reason, 1, ev.row, logprobs, prompt,  # type: ignore[arg-type]
                tuple(ids) if prompt else (), ev.skipping, ev.kv, queued,
            )  # fmt: skip


def make_backend(kind: str, model: str, **options: object) -> ServingBackend:
    """Construct backend `kind` serving `model`; options go to its constructor (e.g. base_url)."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; known: {', '.join(sorted(BACKENDS))}")
    module, _, cls = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), cls)(model, **options)
