"""Candidate placements for a request, each with what the cost model needs to predict it.

A `PlacementSource` lists the placements of one kind that could serve a request: `EdgeModels`,
each online agent x each model it serves; `CloudModel`, the hub's own serving backend. This is the
one place new kinds of placement join routing: split plans over devices, model variants, expert
subsets, layer-skip and KV-prediction options each become a source whose candidates the router
scores with the rest. Add one by writing a subclass that takes a `SourceContext` and naming it in
`SOURCES`; `Placements` asks every configured source in order. The split source (`SplitPlans`) and
the splits callers pin are cloud_hub.split_plans'; the slots a split holds are claimed here
(`claim_split`), since `Placements` claims a pinned split without that source configured.

Each candidate carries its `ModelCost` from `partitioner.cost.served_model_cost`, the rule the
agents' pacers use too, and its queue: requests routed there and not finished, counted from the
routing decision on (`Placements.claim`), so that concurrent requests see each other. Works the hub
holds for a free slot on the agent (`cloud_hub.fleet`) are among them. The router's queue model
(`estimates.queued_estimate`) is of a device running one request at a time; an agent that runs
`max_concurrency` at once is given the rounds ahead of a new request: inflight // max_concurrency.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cloud_hub.backends import ServingBackend
from cloud_hub.calibrations import Calibrations
from cloud_hub.candidates import Candidate, KVOption, SkipOption
from cloud_hub.fleet import AgentSession, Fleet
from cloud_hub.registry import model_config
from device_profiles import DeviceProfile, load_profile
from partitioner.cost import ModelCost, served_model_cost
from tandem.v1 import tandem_pb2 as pb

SOURCES: dict[str, str] = {
    "edge": "cloud_hub.placements:EdgeModels",
    "cloud": "cloud_hub.placements:CloudModel",
    "split": "cloud_hub.split_plans:SplitPlans",
}
"""Placement source name -> "module:Class", imported when used."""

Release = Callable[[], None]


@dataclass(frozen=True)
class SourceContext:
    """What a placement source may draw on: the live fleet and the hub's own backend."""

    fleet: Fleet
    """Agents with an open work channel, their telemetry and status."""
    cloud: ServingBackend | None = None
    """The model the hub serves itself, if any."""
    cloud_profile: DeviceProfile | None = None
    """The hub's hardware, for the cost model (None: the cloud is not a candidate)."""


class PlacementSource(ABC):
    kind: str
    """The `Candidate.kind` of what it lists; `Placements.claim` finds the source by it."""

    @abstractmethod
    def candidates(self, model: str, chat: bool) -> list[Candidate]:
        """Placements serving `model` (any model when empty); chat prompts need a chat model."""

    @abstractmethod
    def models(self) -> list[pb.ModelInfo]:
        """The models it can serve now."""

    @abstractmethod
    def claim(self, candidate: Candidate) -> Release:
        """Count a request routed to `candidate` in its queue; the function returned uncounts it."""


class EdgeModels(PlacementSource):
    """Each online agent x each model it serves."""

    kind = "edge"

    def __init__(self, ctx: SourceContext) -> None:
        self.fleet = ctx.fleet

    def candidates(self, model: str, chat: bool) -> list[Candidate]:
        out = []
        for s in self.fleet.online():
            offers = s.offers
            if offers is None:
                offers = s.offers = _offers(s, self.fleet.calibrations)
            queued = s.inflight // s.max_concurrency  # rounds ahead (see the module docstring)
            for i, (name, is_chat, c) in enumerate(offers):
                if (not model or name == model) and (is_chat or not chat):
                    if c.queued != queued:
                        c = dataclasses.replace(c, queued=queued)
                        offers[i] = (name, is_chat, c)
                    if c.tracker is not None:
                        c.tracker.rtt_ms = s.rtt_ms  # the link as the pings see it now
                    out.append(c)
        return out

    def models(self) -> list[pb.ModelInfo]:
        return [m for s in self.fleet.online() for m in s.models]

    def claim(self, candidate: Candidate) -> Release:
        session = self.fleet.sessions.get(candidate.device_id)
        if session is None:
            return _nothing
        session.inflight += 1

        def release() -> None:  # the session counted, even if a reconnect has replaced it since
            session.inflight -= 1

        return release


class CloudModel(PlacementSource):
    """The model the hub serves itself (local or an OpenAI-compatible upstream)."""

    kind = "cloud"

    def __init__(self, ctx: SourceContext) -> None:
        self.cloud, self.profile = ctx.cloud, ctx.cloud_profile
        self.calibrations = ctx.fleet.calibrations
        self.inflight = 0
        # The candidate as last built: building one costs more than the rest of routing it, and only
        # its queue changes between requests.
        self._candidate: Candidate | None = None

    def candidates(self, model: str, chat: bool) -> list[Candidate]:
        if self.cloud is None or self.profile is None:
            return []
        info = self.cloud.model_info()
        if (model and model != info.name) or (chat and not info.chat):
            return []
        c = self._candidate
        if c is None:
            cost = model_cost(info.config_json, info.weight_bytes)
            tracker = self.calibrations.routing("cloud", self.cloud.model)
            tokens, ratios = info.chat_template_tokens, tuple(info.skip_ratios)
            c = Candidate("cloud", "", self.profile, self.cloud.model, cost, self.inflight, False, tracker, tokens,
                          skip_ratios=ratios, kv_variants=kv_options(info.kv_variants),
                          skip_variants=skip_options(info.skip_variants), quant=info.quant)  # fmt: skip
            self._candidate = c
        if c.queued != self.inflight:
            c = self._candidate = dataclasses.replace(c, queued=self.inflight)
        return [c]

    def models(self) -> list[pb.ModelInfo]:
        return [self.cloud.model_info()] if self.cloud is not None else []

    def claim(self, candidate: Candidate) -> Release:
        self.inflight += 1

        def release() -> None:
            self.inflight -= 1

        return release


def claim_split(fleet: Fleet, candidate: Candidate) -> Release:
    """A split holds its agents' slots: count it on each agent's session (Placements adds the cloud's)."""
    sessions = [fleet.sessions.get(d) for d, _ in candidate.split.agents] if candidate.split else []
    held = [s for s in sessions if s is not None]
    for s in held:
        s.inflight += 1

    def release() -> None:
        for s in held:
            s.inflight -= 1

    return release


class Placements:
    """Every configured source's candidates, and the models served now."""

    def __init__(self, sources: Sequence[PlacementSource], fleet: Fleet | None = None) -> None:
        self.sources = tuple(sources)
        self._by_kind = {s.kind: s for s in self.sources}
        self.fleet = fleet
        """For claiming a split the caller pinned when no "split" source is configured."""

    def candidates(self, model: str, chat: bool) -> list[Candidate]:
        return [c for s in self.sources for c in s.candidates(model, chat)]

    def source(self, kind: str) -> PlacementSource | None:
        """The configured source of `kind` ("edge", "cloud", "split"), if any."""
        return self._by_kind.get(kind)

    def models(self) -> list[pb.ModelInfo]:
        """One ModelInfo per model name: the hub's own model first, then each source's in order."""
        seen: dict[str, pb.ModelInfo] = {}
        for s in sorted(self.sources, key=lambda s: s.kind != "cloud"):
            for m in s.models():
                seen.setdefault(m.name, m)
        return list(seen.values())

    def claim(self, candidate: Candidate, *also: Candidate) -> Release:
        """Count a request routed to `candidate` (and to `also`, an ensemble's other members) in their
        queues; the function returned uncounts them all. A split holds the hub's own model too, and so
        does an ensemble the hub is no member of (its model decodes the mixture)."""
        members = (candidate, *also)
        releases = [self._claim(c) for c in members]
        cloud = self._by_kind.get("cloud")
        if cloud is not None and (candidate.kind == "split" or (also and all(c.kind != "cloud" for c in members))):
            releases.append(cloud.claim(candidate))
        if len(releases) == 1:
            return releases[0]

        def release() -> None:
            for r in releases:
                r()

        return release

    def _claim(self, candidate: Candidate) -> Release:
        source = self._by_kind.get(candidate.kind)
        if source is not None:
            return source.claim(candidate)
        if candidate.kind == "split" and self.fleet is not None:
            return claim_split(self.fleet, candidate)
        raise KeyError(f"no placement source of kind {candidate.kind!r}")


def make_sources(names: Sequence[str], ctx: SourceContext) -> list[PlacementSource]:
    """Sources by name (SOURCES), in order; raises ValueError for an unknown name."""
    out = []
    for name in names:
        if name not in SOURCES:
            raise ValueError(f"unknown placement source {name!r}; known: {', '.join(sorted(SOURCES))}")
        module, _, cls = SOURCES[name].partition(":")
        out.append(getattr(importlib.import_module(module), cls)(ctx))
    return out


def kv_options(variants: Iterable[pb.KVVariant]) -> tuple[KVOption, ...]:
    """The hub's copies of the KV-prediction variants a ModelInfo advertises, their float32 figures
    rounded to 6 places (an agreement of 0.9 stays 0.9 against a quality_floor of 0.9)."""
    r = functools.partial(round, ndigits=6)
    return tuple(
        KVOption(r(v.depth), tuple(v.aux_layers), r(v.agreement), r(v.bpb_ratio), r(v.prefill_share)) for v in variants
    )


def skip_options(variants: Iterable[pb.SkipVariant]) -> tuple[SkipOption, ...]:
    """The hub's copies of the layer-skipping variants a ModelInfo advertises, their float32 figures
    rounded to 6 places (as kv_options)."""
    r = functools.partial(round, ndigits=6)
    return tuple(SkipOption(r(v.ratio), v.layers, r(v.agreement)) for v in variants)


def _nothing() -> None:
    pass


def _offers(s: AgentSession, calibrations: Calibrations) -> list[tuple[str, bool, Candidate]]:
    """(model name, chat, candidate) for each model a session serves; candidates count it idle."""
    profile = device_profile(s.record.profile)
    out = []
    for m in s.models:
        cost = model_cost(m.config_json, m.weight_bytes)
        tracker = calibrations.routing(s.device_id, m.name)
        tokens, ratios = m.chat_template_tokens, tuple(m.skip_ratios)
        c = Candidate("edge", s.device_id, profile, m.name, cost, 0, s.record.emulated, tracker, tokens,
                      skip_ratios=ratios, kv_variants=kv_options(m.kv_variants),
                      skip_variants=skip_options(m.skip_variants), quant=m.quant)  # fmt: skip
        out.append((m.name, m.chat, c))
    return out


@functools.lru_cache(maxsize=256)
def device_profile(name: str) -> DeviceProfile:
    """A device's profile, parsed once (load_profile stats the name as a path on every call, and
    the router needs every candidate's profile on every request)."""
    return load_profile(name)


@functools.lru_cache(maxsize=256)
def model_cost(config_json: str, weight_bytes: int = 0) -> ModelCost:
    """`served_model_cost` of an advertised model (cached: the router needs it for every candidate of
    every request). Raises InvalidRequest for a config the cost model cannot read."""
    return served_model_cost(model_config(pb.ModelInfo(config_json=config_json)), weight_bytes)
