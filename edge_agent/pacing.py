"""The agent's engine: our runtime behind a lock, optionally paced to a device profile.

Requests run one at a time (the lock); others wait in the agent's queue, which telemetry reports
as queue depth. Tokens come from an `InferenceEngine` (edge_agent/engines: torch on CPU or CUDA,
onnxruntime, tensorrt) when one is given, else from the model's own generator (batch-capable,
used by the hub's cloud backend too).

Pacing emulates a device class this machine is not: tokens are held back so that TTFT and time
per token are at least the profile's predicted values. Pacing can only slow down; a profile
faster than this machine runs at this machine's speed, and the agent says so.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from device_profiles import DeviceProfile
from edge_agent.engines.base import InferenceEngine
from models.config import ModelConfig
from models.generate import Continuation, Prompt, TokenEvent
from models.runtime import LoadedModel
from models.sampling import SamplingParams
from partitioner.cost import ModelCost, decode_ms, prefill_ms
from tandem.v1 import tandem_pb2 as pb


@dataclass(frozen=True)
class Pace:
    """Minimum timings to emulate: first token after ttft_ms, then one every tpot_ms."""

    ttft_ms: float
    tpot_ms: float


Pacer = Callable[[int, int], Pace]  # (prompt tokens, max new tokens) -> the timings to emulate


def profile_pacer(profile: DeviceProfile, cfg: ModelConfig, bits_per_weight: float = 32.0) -> Pacer:
    """Pace to the cost model's prediction for `profile` (link time excluded: that is real)."""
    cost = ModelCost.from_config(cfg, bits_per_weight=bits_per_weight)

    def pace(prompt_tokens: int, max_tokens: int) -> Pace:
        return Pace(prefill_ms(profile, cost, prompt_tokens), decode_ms(profile, cost, prompt_tokens + max_tokens / 2))

    return pace


def floor_pacer(inner: Pacer | None, tpot_ms: float) -> Pacer:
    """At least tpot_ms per token, and at least what `inner` asks for."""

    def pace(prompt_tokens: int, max_tokens: int) -> Pace:
        base = inner(prompt_tokens, max_tokens) if inner else Pace(0.0, 0.0)
        return Pace(base.ttft_ms, max(base.tpot_ms, tpot_ms))

    return pace


class LocalEngine:
    def __init__(
        self, name: str, loaded: LoadedModel, pacer: Pacer | None = None, backend: InferenceEngine | None = None
    ) -> None:
        """`backend`: an engine that has loaded this model (its `loaded` is usually `loaded`)."""
        self.name = name
        self.loaded = loaded
        self.pacer = pacer
        self.backend = backend
        self._lock = threading.Lock()
        self._requests = itertools.count()

    def model_info(self) -> pb.ModelInfo:
        return pb.ModelInfo(**self.loaded.describe(self.name))

    def warmup(self) -> None:
        """One short generation, so the first real request does not pay for lazy initialisation."""
        for _ in self.stream([1, 2, 3, 4], SamplingParams(max_tokens=2, ignore_eos=True), threading.Event()):
            pass

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text, chat messages or ids); raises models.errors.InvalidRequest."""
        return self.loaded.generator().encode_prompt(prompt)

    def stream(
        self, ids: list[int], params: SamplingParams, cancel: threading.Event, continuation: Continuation | None = None
    ) -> Iterator[TokenEvent]:
        """Generate from prompt token ids (going on from `continuation`), one request at a time, paced."""
        with self._lock:
            start = time.perf_counter()
            pace = self.pacer(len(ids), params.max_tokens) if self.pacer else None
            gen = self.loaded.generator()
            if self.backend is not None:
                events = gen.stream_engine(self.backend, f"r{next(self._requests)}", ids, params, continuation)
            else:
                events = gen.stream([ids], params, [continuation] if continuation is not None else None)
            with contextlib.closing(events):  # a cancelled request releases its engine state under the lock
                for i, event in enumerate(events):
                    if cancel.is_set():
                        return
                    if pace is not None:
                        due = start + (pace.ttft_ms + i * pace.tpot_ms) / 1000
                        time.sleep(max(0.0, due - time.perf_counter()))
                    yield event
