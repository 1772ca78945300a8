"""Candidate placements for a request, each with what the cost model needs to predict it.

A `PlacementSource` lists the placements of one kind that could serve a request: `EdgeModels`,
each online agent x each model it serves; `CloudModel`, the hub's own serving backend. This is the
one place new kinds of placement join routing: split plans over devices, model variants, expert
subsets, layer-skip and KV-prediction options each become a source whose candidates the router
scores with the rest. Add one by writing a subclass that takes a `SourceContext` and naming it in
`SOURCES`; `Placements` asks every configured source in order.

Each candidate carries its `ModelCost` from `partitioner.cost.served_model_cost`, the rule the
agents' pacers use too, and its queue: requests routed there and not finished, counted from the
routing decision on (`Placements.claim`), so that concurrent requests see each other. Works the hub
holds for a free slot on the agent (`cloud_hub.fleet`) are among them. The router's queue model
(`router.queued_estimate`) is of a device running one request at a time; an agent that runs
`max_concurrency` at once is given the rounds ahead of a new request: inflight // max_concurrency.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cloud_hub.backends import ServingBackend
from cloud_hub.calibrations import Calibrations, split_key
from cloud_hub.errors import InvalidRequest, NotFound
from cloud_hub.fleet import AgentSession, Fleet
from cloud_hub.registry import model_config
from cloud_hub.router import Candidate, KVOption, SkipOption, SplitSpec, split_plan
from device_profiles import DeviceProfile, load_profile
from partitioner.cost import ModelCost, served_model_cost
from partitioner.predict import stage_parts
from tandem.v1 import tandem_pb2 as pb

log = logging.getLogger("tandem.hub")

SOURCES: dict[str, str] = {
    "edge": "cloud_hub.placements:EdgeModels",
    "cloud": "cloud_hub.placements:CloudModel",
    "split": "cloud_hub.placements:SplitPlans",
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


@dataclass(frozen=True)
class Rebalance:
    """A split plan that moved: new requests get the new cut, in-flight ones finish on theirs."""

    device_id: str
    old: tuple[int, ...]
    new: tuple[int, ...]
    gain: float
    """Predicted total time of the reference request under the old plan over the new one, less 1."""
    at: float


class SplitPlans(PlacementSource):
    """Each online agent serving the hub's own model at the same precision, split with the hub: the
    agent runs the first layers, the hub the rest (cloud_hub.split). Only a local cloud model can run
    a layer range.

    The cut is the partitioner's interior single cut (router.split_plan) for a reference request
    (REFERENCE), predicted from what the hub has measured: the agent's and the hub's calibrations
    (partitioner.predict.stage_parts) and the agent's round trip from the work channel's pings. When
    those move, the plan is solved again; it changes only when the new cut is predicted faster by more
    than REBALANCE_MARGIN (hysteresis), and the switch is logged with its gain (`rebalances`). New
    requests get the new cut; one in flight keeps the plan it started with."""

    kind = "split"
    REFERENCE = (256, 64)
    """(prompt tokens, new tokens) the plan is chosen for."""
    REBALANCE_MARGIN = 0.10

    def __init__(self, ctx: SourceContext) -> None:
        self.fleet, self.cloud, self.profile = ctx.fleet, ctx.cloud, ctx.cloud_profile
        self._offers: dict[str, tuple[tuple, Candidate]] = {}  # device id -> (what it was planned from, candidate)
        self.rebalances: list[Rebalance] = []

    def candidates(self, model: str, chat: bool) -> list[Candidate]:
        if self.cloud is None or self.profile is None or not hasattr(self.cloud, "served"):
            return []
        info = self.cloud.model_info()
        if (model and model != info.name) or (chat and not info.chat):
            return []
        out = []
        for s in self.fleet.online():
            if not serves(s, info):
                continue
            c = self._offer(s, info)
            queued = s.inflight // s.max_concurrency
            out.append(c if c.queued == queued else dataclasses.replace(c, queued=queued))
        return out

    def _offer(self, s: AgentSession, info: pb.ModelInfo) -> Candidate:
        """The session's split candidate, planned again when what it is predicted from has moved."""
        assert self.profile is not None
        free, inputs = split_spec(self.fleet, [s], info, self.profile)
        held = self._offers.get(s.device_id)
        if held is not None and held[0] == inputs:
            return held[1]
        cost = model_cost(info.config_json, info.weight_bytes)
        best = split_plan(free, cost, *self.REFERENCE).cuts
        cuts = best
        if held is not None and held[1].split is not None and held[1].split.cuts != best:
            old = held[1].split.cuts
            was, now = (split_plan(dataclasses.replace(free, cuts=k), cost, *self.REFERENCE) for k in (old, best))
            steps = self.REFERENCE[1] - 1
            gain = (was.ttft_ms + steps * was.tpot_ms) / (now.ttft_ms + steps * now.tpot_ms) - 1
            if gain > self.REBALANCE_MARGIN:
                self.rebalances.append(Rebalance(s.device_id, old, best, gain, time.time()))
                log.info("split plan for %s rebalanced: cut %s -> %s, predicted %.0f%% faster", s.device_id, old,
                         best, 100 * gain)  # fmt: skip
            else:
                cuts = old  # within the hysteresis margin: keep the plan
        c = split_candidate(self.fleet, dataclasses.replace(free, cuts=cuts), info, s.record.emulated)
        self._offers[s.device_id] = (inputs, c)
        return c

    def current_cut(self, device_id: str) -> int | None:
        """The cut new split requests with `device_id` get now (None: not planned yet)."""
        held = self._offers.get(device_id)
        return held[1].split.cuts[0] if held is not None and held[1].split is not None else None

    def models(self) -> list[pb.ModelInfo]:
        return []  # the cloud's and the agents' own sources list what is served

    def claim(self, candidate: Candidate) -> Release:
        return claim_split(self.fleet, candidate)


def serves(session: AgentSession, info: pb.ModelInfo) -> bool:
    """The agent serves the model `info` describes at its precision: it can hold a split's layers of it."""
    return any(m.name == info.name and m.quant == info.quant for m in session.models)


def split_candidate(fleet: Fleet, spec: SplitSpec, info: pb.ModelInfo, emulated: bool) -> Candidate:
    """The routing candidate of split `spec` of the hub's model `info` (its first agent names it). Its
    tracker is the pipeline's own (calibrations.split_key over its agents): what splits over these
    devices measured against their plans' predictions corrects the next plan's."""
    device, profile = spec.agents[0]
    cost = model_cost(info.config_json, info.weight_bytes)
    tracker = fleet.calibrations.routing(split_key([d for d, _ in spec.agents]), info.name)
    return Candidate("split", device, profile, info.name, cost, 0, emulated, tracker, info.chat_template_tokens, spec)


SPLIT_PIN = "split:"
"""A request's device naming a split plan: "split:DEVICE:END[,DEVICE:END…]" (pinned_split)."""


def pinned_split(fleet: Fleet, cloud: ServingBackend | None, profile: DeviceProfile | None, pin: str,
                 model: str) -> Candidate:  # fmt: skip
    """The split a caller pinned with device "split:DEV:END[,DEV:END…]": agent DEV runs layers up to
    END (the first from 0, each next from the previous END), the hub's own model `cloud` (on
    `profile`) the rest. Raises InvalidRequest or NotFound naming what does not hold."""
    if cloud is None or profile is None or not hasattr(cloud, "served"):
        raise InvalidRequest("device: a split needs the hub to serve the model itself, locally")
    info = cloud.model_info()
    if model and model != info.name:
        raise InvalidRequest(f"device: a split runs the hub's own model {info.name!r}, not {model!r}")
    sessions, cuts = [], []
    for part in pin[len(SPLIT_PIN) :].split(","):
        device, _, end = part.rpartition(":")
        if not device or not end.isdigit():
            raise InvalidRequest(f"device: {pin!r} is not split:DEVICE:END[,DEVICE:END…]")
        session = fleet.sessions.get(device)
        if session is None or session.closed:
            raise NotFound(f"device: {device!r} is not online")
        if not serves(session, info):
            raise InvalidRequest(f"device: {device!r} does not serve {info.name} at {info.quant}, as the hub does")
        sessions.append(session)
        cuts.append(int(end))
    n = info.n_layers
    if not all(a < b for a, b in zip([0, *cuts], [*cuts, n], strict=True)):
        raise InvalidRequest(f"device: layer boundaries {cuts} must rise within (0, {n}) for {info.name}")
    spec, _ = split_spec(fleet, sessions, info, profile, tuple(cuts))
    return split_candidate(fleet, spec, info, sessions[0].record.emulated)


def split_spec(
    fleet: Fleet, sessions: Sequence[AgentSession], info: pb.ModelInfo, cloud: DeviceProfile, cuts: tuple[int, ...] = ()
) -> tuple[SplitSpec, tuple]:
    """A split over `sessions` (in pipeline order) and the hub, predicted from what the hub measured:
    each side's calibration (partitioner.predict.stage_parts; the roofline where there is none), each
    agent's round trip from the work channel's pings and its uplink from split prompts' transfers
    (cloud_hub.split.measure_uplink). Also returns what it was built from (round trips in 0.5 ms
    steps, uplinks to two digits, so that noise does not re-plan), to tell when to build it again."""
    agents, timings, links, inputs = [], [], [], []
    for s in sessions:
        tracker = fleet.calibrations.routing(s.device_id, info.name)
        profile = _profile(s.record.profile)
        rtt = round(s.rtt_ms * 2) / 2 if s.rtt_ms is not None else None
        up = float(f"{s.uplink_mbps:.2g}") if s.uplink_mbps else None  # two significant digits
        agents.append((s.device_id, profile))
        timings.append(stage_parts(tracker.calibration if tracker else None, s.record.emulated))
        link = profile.link if rtt is None else dataclasses.replace(profile.link, rtt_ms=rtt)
        links.append(link if up is None else dataclasses.replace(link, uplink_mbps=up))
        inputs += [id(s), rtt, up, id(tracker and tracker.calibration)]
    hub = fleet.calibrations.routing("cloud", info.name)
    timings.append(stage_parts(hub.calibration if hub else None))
    inputs.append(id(hub and hub.calibration))
    return SplitSpec(tuple(agents), cloud, cuts, tuple(timings), tuple(links)), tuple(inputs)


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
    profile = _profile(s.record.profile)
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
def _profile(name: str) -> DeviceProfile:
    """A device's profile, parsed once (load_profile stats the name as a path on every call, and
    the router needs every candidate's profile on every request)."""
    return load_profile(name)


@functools.lru_cache(maxsize=256)
def model_cost(config_json: str, weight_bytes: int = 0) -> ModelCost:
    """`served_model_cost` of an advertised model (cached: the router needs it for every candidate of
    every request). Raises InvalidRequest for a config the cost model cannot read."""
    return served_model_cost(model_config(pb.ModelInfo(config_json=config_json)), weight_bytes)
