"""One request's progress in the hub, across placements: what it produced, and the hub's own times.

`Progress` accumulates the answer's tokens and text as placements stream them (`add` makes the
`Chunk`s the caller gets), what failed over, and the times the answer's metrics report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cloud_hub.candidates import Candidate
from cloud_hub.journal import RequestRecord
from models.kvpred import KVReport
from models.sampling import SamplingParams
from models.skip import SkipReport
from partitioner.split import Plan
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import Logprob, set_kv_report


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]
    index: int = 0
    """The choice (SamplingParams.n) these tokens belong to."""
    logprobs: tuple[Logprob, ...] = ()
    """One a token, when the request asked for logprobs."""
    prompt_logprobs: tuple[Logprob | None, ...] = ()
    """On a choice's first chunk, when the request asked for prompt logprobs (echo)."""
    prompt_ids: tuple[int, ...] = ()
    """With prompt_logprobs: the prompt's token ids."""
    finish_reason: str = ""
    """Set on a choice's last chunk."""


@dataclass
class Progress:
    """What one request has produced so far, across placements."""

    ids: list[int] = field(default_factory=list)
    """Token ids of the answer so far (text-exact; an upstream's are re-tokenized from its text)."""
    tokens: int = 0
    """Tokens generated so far, as the engines counted them."""
    chars: int = 0
    finish: str = ""
    energy_j: float = 0.0
    prompt_tokens: int = 0
    placements: list[pb.Placement] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    finishes: dict[int, str] = field(default_factory=dict)
    """Each finished choice's finish reason, by index."""
    first: float = 0.0
    last: float = 0.0
    engine_ttft_ms: float = 0.0
    engine_tpot_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    queue_ms: float = 0.0
    energy_measured: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    record: RequestRecord | None = None
    """Its entry in the hub's journal."""
    plan: Plan | None = None
    """The split plan of the placement under way (kind "split")."""
    ensemble: tuple[tuple[Candidate, float], ...] = ()
    """The MoE² ensemble of the placement under way (its members and weights); empty: one placement."""
    route_s: float = 0.0
    """Hub time routing and dispatching, over all placements (see HubService.generate)."""
    relay_s: float = 0.0
    """Hub time relaying: each token's and the end's arrival to hand-off, summed."""
    mark: float = 0.0
    """Start of the routing stretch under way (0: the arrival)."""
    received: float = 0.0
    """Arrival of the item being relayed now (0: none)."""
    skipping: SkipReport | None = None
    """The layer-skipping report of the placement that finished the request (after a failover, the
    last one's): what its decode skipped (models.skip)."""
    kv: KVReport | None = None
    """The KV-prediction report of the placement that finished the request (models.kvpred)."""

    def routed(self) -> None:
        """Started is ready to hand off: routing since `mark` ends (dispatch comes after it)."""
        self.route_s += time.perf_counter() - (self.mark or self.arrived)

    def dispatched(self) -> None:
        """The work has left for its placement: the stretch since Started's hand-off was routing too."""
        self.route_s += time.perf_counter() - self.mark

    def handed_off(self) -> None:
        """What arrived at `received` is handed to the caller's stream: relay time."""
        if self.received:
            self.relay_s += time.perf_counter() - self.received
            self.received = 0.0

    def add(
        self,
        text: str,
        ids: tuple[int, ...],
        finish: str | None,
        tokens: int,
        index: int = 0,
        logprobs: tuple[Logprob, ...] = (),
        prompt_logprobs: tuple[Logprob | None, ...] = (),
        prompt_ids: tuple[int, ...] = (),
    ) -> Chunk:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.ids += ids
        self.tokens += tokens
        self.chars += len(text)
        self.finish = finish or self.finish
        if finish:
            self.finishes[index] = finish
        if index or logprobs or prompt_logprobs or finish:
            return Chunk(text, ids, index, logprobs, prompt_logprobs, prompt_ids, finish or "")
        return Chunk(text, ids)

    def done(self, params: SamplingParams) -> bool:
        """Every choice has finished (a failure after that loses nothing)."""
        if params.n > 1:
            return len(self.finishes) >= params.n
        return bool(self.finish) or self.tokens >= params.max_tokens

    def metrics(self) -> pb.Metrics:
        """The answer's metrics; the hub's own times are filled in at its hand-off."""
        count = self.tokens
        ttft = ((self.first or time.perf_counter()) - self.arrived) * 1000
        tpot = (self.last - self.first) * 1000 / (count - 1) if count > 1 else 0.0
        metrics = pb.Metrics(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=count,
            ttft_ms=ttft,
            tpot_ms=tpot,
            energy_j=self.energy_j,
            engine_ttft_ms=self.engine_ttft_ms,
            engine_tpot_ms=self.engine_tpot_ms,
            prefill_ms=self.prefill_ms,
            decode_ms=self.decode_ms,
            queue_ms=self.queue_ms,
            energy_measured=self.energy_measured,
        )
        s = self.skipping
        if s is not None:
            metrics.skipped_layers.extend(s.layers)
            metrics.lossless, metrics.drafted, metrics.accepted = s.lossless, s.drafted, s.accepted
        if self.kv is not None:
            set_kv_report(metrics, **vars(self.kv))
        return metrics
