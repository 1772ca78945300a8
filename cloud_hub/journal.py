"""The hub's journal of recent requests: where each ran, why, and what it measured against its budget.

`HubService` opens a `RequestRecord` for every request it takes, adds the router's decision (every
candidate it weighed, `cloud_hub.router.Scored`) and the placements, and closes it with the answer's
metrics or the error. The fleet page (`cloud_hub.ui`) reads it; nothing on the request path does.

Bounded both ways: the last `size` records, of which only the last `detail` keep the router's
candidates (a fleet of a thousand devices weighs a thousand candidates a request). Each hub replica
journals the requests it served. `version` counts changes, so a reader polls it instead of re-reading.
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, field

from cloud_hub.router import Choice, Scored
from tandem.types import Budget
from tandem.v1 import tandem_pb2 as pb


@dataclass(slots=True)
class RequestRecord:
    id: str
    """Hub-unique within the journal: "r" and a sequence number."""
    at: float
    """Unix time the hub took the request."""
    model: str
    """The model asked for ("" = any)."""
    chat: bool
    max_tokens: int
    n: int
    budget: Budget
    device: str = ""
    """The device the caller pinned it to ("" = the router chose)."""
    prompt_tokens: int = 0
    """Tokens of the prompt as routed (the engine's count once it answered)."""
    placements: tuple[pb.Placement, ...] = ()
    """Every placement it ran on, the failovers' after the first."""
    metrics: pb.Metrics | None = None
    """The answer's measured figures (None until it finished, or when it failed)."""
    outcome: str = "running"
    """"running", "ok", "cancelled", or the HubError's kind (budget_unsatisfiable, unavailable, …)."""
    error: str = ""
    considered: tuple[Scored, ...] = ()
    """Every candidate of its first routing (the one that honoured the budget), as the router weighed them."""
    chosen: int = -1
    """Index in `considered` of the candidate chosen (-1: none, it was refused)."""
    quantile: float = 0.0
    """The admission quantile the router used (0: mean prediction)."""
    ended: float = 0.0
    """Unix time it finished."""

    @property
    def kept(self) -> bool | None:
        """Whether the answer kept every limit its budget set (None: no budget, or not served)."""
        b, m = self.budget, self.metrics
        pairs = ((b.ttft_ms, m.ttft_ms), (b.tpot_ms, m.tpot_ms), (b.energy_j, m.energy_j)) if m else ()
        limits = [(limit, value) for limit, value in pairs if limit > 0]
        if not limits:
            return None
        return all(value <= limit for limit, value in limits)


@dataclass
class Journal:
    size: int = 500
    """Records kept."""
    detail: int = 100
    """Records that keep their router candidates (the newest)."""
    records: collections.deque[RequestRecord] = field(default_factory=collections.deque)
    version: int = 0
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _by_id: dict[str, RequestRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.detail <= self.size:
            raise ValueError(f"Journal needs size >= 1 and 0 <= detail <= size, got {self.size} and {self.detail}")

    def open(self, model: str, chat: bool, max_tokens: int, n: int, budget: Budget, device: str) -> RequestRecord:
        rec = RequestRecord(f"r{next(self._ids)}", time.time(), model, chat, max_tokens, n, budget, device)
        self.records.append(rec)
        self._by_id[rec.id] = rec
        if len(self.records) > self.size:
            del self._by_id[self.records.popleft().id]
        if len(self.records) > self.detail:  # the one that just left the detailed window
            self.records[-self.detail - 1].considered = ()
        self.version += 1
        return rec

    def routed(self, rec: RequestRecord, choice: Choice, prompt_tokens: int) -> None:
        """Its first routing: what the router weighed and which it chose."""
        rec.considered = choice.considered
        rec.chosen = next((i for i, s in enumerate(choice.considered) if s[0] is choice.candidate), -1)
        rec.quantile, rec.prompt_tokens = choice.quantile, prompt_tokens
        self.version += 1

    def placed(self, rec: RequestRecord, placements: tuple[pb.Placement, ...]) -> None:
        rec.placements = placements
        self.version += 1

    def refused(self, rec: RequestRecord, considered: tuple[Scored, ...], quantile: float, prompt_tokens: int) -> None:
        """No placement met the budget: what the router weighed (at `quantile`), none chosen."""
        rec.considered, rec.quantile, rec.prompt_tokens = considered, quantile, prompt_tokens
        self.version += 1

    def close(self, rec: RequestRecord, outcome: str, metrics: pb.Metrics | None = None, error: str = "") -> None:
        rec.outcome, rec.metrics, rec.error, rec.ended = outcome, metrics, error, time.time()
        if metrics is not None and metrics.prompt_tokens:
            rec.prompt_tokens = metrics.prompt_tokens
        self.version += 1

    def get(self, request_id: str) -> RequestRecord | None:
        return self._by_id.get(request_id)

    def recent(self, n: int) -> list[RequestRecord]:
        """The newest `n` records, newest first."""
        return list(itertools.islice(reversed(self.records), n))
