"""Split placements: an agent's first layers, then the hub's own model (cloud_hub.split).

`SplitPlans` is the placement source "split" (opt-in, cloud_hub.placements.SOURCES): each online agent
serving the hub's own model at its precision, with the cut the partitioner predicts fastest and moved
only past a margin (`Rebalance`). `pinned_split` is the split a caller names with its device
("split:DEVICE:END[,DEVICE:END…]", `SPLIT_PIN`), over one agent or several in pipeline order.
`split_spec` and `split_candidate` build either from what the hub has measured. They are apart from
the edge and cloud sources (cloud_hub.placements) because only splits plan over devices; their slots
are claimed by cloud_hub.placements.claim_split, which `Placements` needs without importing this.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cloud_hub.backends import ServingBackend
from cloud_hub.calibrations import split_key
from cloud_hub.candidates import Candidate, SplitSpec
from cloud_hub.errors import InvalidRequest, NotFound
from cloud_hub.estimates import split_plan
from cloud_hub.fleet import AgentSession, Fleet
from cloud_hub.placements import PlacementSource, Release, SourceContext, claim_split, device_profile, model_cost
from device_profiles import DeviceProfile
from partitioner.predict import stage_parts
from tandem.v1 import tandem_pb2 as pb

log = logging.getLogger("tandem.hub")


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

    The cut is the partitioner's interior single cut (estimates.split_plan) for a reference request
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
        profile = device_profile(s.record.profile)
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
