"""What the fleet page shows, as plain rows: pure functions over the registry's devices, the live
fleet and the hub's journal. The templates only lay these out (and Jinja escapes every string)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from cloud_hub.fleet import Fleet, Telemetry
from cloud_hub.journal import RequestRecord
from cloud_hub.router import Scored
from tandem.v1 import tandem_pb2 as pb


@dataclass(frozen=True)
class FleetRow:
    kind: str
    """"edge" or "cloud" (the hub's own model)."""
    device_id: str
    name: str
    profile: str
    status: str
    """"online" or "offline"."""
    emulated: bool
    models: tuple[str, ...]
    """Each model it serves: "name · engine · precision"."""
    load: str
    queue: str
    power: str
    temperature: str
    last_seen: str


@dataclass(frozen=True)
class RequestRow:
    id: str
    at: str
    model: str
    budget: str
    placements: tuple[str, ...]
    predicted: tuple[str, str, str]
    """TTFT, time per token, energy as the first placement predicted them."""
    measured: tuple[str, str, str]
    kept: bool | None
    outcome: str
    error: str


@dataclass(frozen=True)
class CandidateRow:
    where: str
    profile: str
    model: str
    queued: int
    calibrated: bool
    predicted: tuple[str, str, str]
    admitted: tuple[str, str, str]
    verdict: str
    """"chosen", "fits" or "ruled out"."""
    reason: str


def ago(then: float, now: float) -> str:
    """ "3 s ago", "4 min ago", "2 h ago"; "never" for 0."""
    if then <= 0:
        return "never"
    s = max(0.0, now - then)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.0f} h ago"


def ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms" if value > 0 else "—"


def joules(value: float) -> str:
    return f"{value:.3g} J" if value > 0 else "—"


def model_line(m: pb.ModelInfo) -> str:
    return " · ".join(x for x in (m.name, m.engine, m.quant) if x)


def _power(t: Telemetry | None) -> str:
    if t is None or not t.at:
        return "—"
    how = f"measured ({t.power_sensor})" if t.power_sensor else "estimated"
    return f"{t.power_w:.1f} W {how}"


def fleet_rows(
    devices: list[pb.Device],
    fleet: Fleet,
    cloud: pb.ModelInfo | None,
    cloud_profile: str,
    cloud_queue: int,
    now: float | None = None,
) -> list[FleetRow]:
    """The hub's own model first (when it serves one), then every registered device, online first."""
    now = time.time() if now is None else now
    rows = []
    if cloud is not None:
        rows.append(
            FleetRow(
                "cloud",
                "cloud",
                "the hub's own model",
                cloud_profile,
                "online",
                False,
                (model_line(cloud),),
                "—",
                f"{cloud_queue} running",
                "—",
                "—",
                "now",
            )
        )
    for d in sorted(devices, key=lambda d: (d.status != "online", d.name)):
        session = fleet.sessions.get(d.device_id)
        t = fleet.telemetry.get(d.device_id)
        models = session.models if session is not None and not session.closed else d.models
        queue = "—"
        if session is not None and not session.closed:
            held = session.waiting
            queue = f"{session.inflight - held} running" + (f", {held} held" if held else "")
        temperature = f"{t.temperature_c:.0f} °C" if t is not None and t.temperature_c is not None else "—"
        rows.append(
            FleetRow(
                "edge",
                d.device_id,
                d.name,
                d.profile,
                d.status,
                d.emulated,
                tuple(model_line(m) for m in models),
                f"{t.load:.0%}" if t is not None and t.at else "—",
                queue,
                _power(t),
                temperature,
                ago(d.last_seen_unix, now),
            )
        )
    return rows


def budget_text(rec: RequestRecord) -> str:
    b = rec.budget
    parts = [f"TTFT ≤ {b.ttft_ms:g} ms"] if b.ttft_ms else []
    parts += [f"TPOT ≤ {b.tpot_ms:g} ms"] if b.tpot_ms else []
    parts += [f"≤ {b.energy_j:g} J"] if b.energy_j else []
    text = ", ".join(parts) or "none"
    return text + (" (best effort)" if b.best_effort else "")


def placement_text(p: pb.Placement, names: dict[str, str]) -> str:
    where = names.get(p.device_id, p.device_id) if p.device_id else "cloud"
    layers = f", layers {p.layer_start}–{p.layer_end}" if p.layer_end else ""
    return f"{p.kind}: {where} ({p.profile}{', emulated' if p.emulated else ''}{layers})"


def attempts(placements: Sequence[pb.Placement], names: dict[str, str]) -> tuple[str, ...]:
    """One line per placement the request ran on, in order (a failover starts the next): a split's
    stages, which continue each other's layers, share one line."""
    out: list[list[str]] = []
    for i, p in enumerate(placements):
        prev = placements[i - 1] if i else None
        joined = prev is not None and p.kind == prev.kind == "split" and p.layer_start == prev.layer_end > 0
        text = placement_text(p, names)
        if joined:
            out[-1].append(text.removeprefix("split: "))
        else:
            out.append([text])
    return tuple(" + ".join(parts) for parts in out)


def request_rows(records: list[RequestRecord], names: dict[str, str]) -> list[RequestRow]:
    out = []
    for r in records:
        first = r.placements[0] if r.placements else None
        predicted = (
            (ms(first.predicted_ttft_ms), ms(first.predicted_tpot_ms), joules(first.predicted_energy_j))
            if first is not None
            else ("—", "—", "—")
        )
        m = r.metrics
        measured = (ms(m.ttft_ms), ms(m.tpot_ms), joules(m.energy_j)) if m is not None else ("—", "—", "—")
        out.append(
            RequestRow(
                r.id,
                time.strftime("%H:%M:%S", time.localtime(r.at)),
                r.model or "any",
                budget_text(r),
                attempts(r.placements, names),
                predicted,
                measured,
                r.kept,
                r.outcome,
                r.error,
            )
        )
    return out


def _rank(s: Scored) -> tuple:
    """The router's preference (cloud_hub.router.BudgetRouter): the edge, then less energy, then faster."""
    c, est = s[0], s[1]
    return (c.kind != "edge", est.edge_energy_j, est.total_ms)


def _why_not(s: Scored, chosen: Scored) -> str:
    """Why a candidate that fits its budget lost to the chosen one."""
    (c, est), (c0, est0) = s[:2], chosen[:2]
    if c.kind != "edge" and c0.kind == "edge":
        return "fits; the edge is preferred to the cloud"
    if est.edge_energy_j != est0.edge_energy_j:
        return f"fits; more edge energy ({est.edge_energy_j:.3g} J against {est0.edge_energy_j:.3g} J)"
    return f"fits; slower ({est.total_ms:.0f} ms in all against {est0.total_ms:.0f} ms)"


def _where(c: object, names: dict[str, str]) -> str:
    """A candidate's place: a device's name, "cloud", or a split's devices then the hub."""
    split = getattr(c, "split", None)
    if split is not None:
        cuts = f" at layer {', '.join(map(str, split.cuts))}" if split.cuts else ""
        return "split: " + " + ".join(names.get(d, d) for d, _ in split.agents) + " + cloud" + cuts
    device = getattr(c, "device_id", "")
    return names.get(device, device) if device else "cloud"


def decision_rows(rec: RequestRecord, names: dict[str, str]) -> list[CandidateRow]:
    """Every candidate of the request's first routing, the chosen one first, then those that fit, then
    those ruled out by how far over budget they were."""
    chosen = rec.considered[rec.chosen] if rec.chosen >= 0 else None
    labels = {"ttft_ms": "TTFT", "tpot_ms": "time per token", "energy_j": "energy", "memory": "memory"}
    rows = []
    for i, s in enumerate(rec.considered):
        c, est, adm, v = s
        over = {k: r for k, r in v.items() if r > 1.0}
        if i == rec.chosen:
            verdict = "chosen"
            reason = "best effort: the closest to its budget" if over else "fits; preferred of those that fit"
        elif not over:
            verdict, reason = "fits", _why_not(s, chosen) if chosen is not None else "fits"
        else:
            verdict = "ruled out"
            worst = sorted(over.items(), key=lambda kv: -kv[1])
            reason = "; ".join(
                "fits in no device's memory" if k == "memory" else f"{labels.get(k, k)} {r:.2f}× its limit"
                for k, r in worst
            )
        rows.append(
            (
                (0 if verdict == "chosen" else 1 if verdict == "fits" else 2, max(v.values(), default=0.0)),
                CandidateRow(
                    _where(c, names),
                    c.profile.name,
                    c.model,
                    c.queued,
                    c.tracker is not None and c.tracker.calibration is not None,
                    (ms(est.ttft_ms), ms(est.tpot_ms), joules(est.edge_energy_j)),
                    (ms(adm.ttft_ms), ms(adm.tpot_ms), joules(adm.edge_energy_j)),
                    verdict,
                    reason,
                ),
            )
        )
    return [row for _, row in sorted(rows, key=lambda kr: kr[0])]


def series(records: list[RequestRecord], names: dict[str, str]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Points (end time, value) for the page's plots, oldest first, from the served requests: measured
    TTFT and energy by placement (the device, or "cloud") and by placement kind, and the TTFT
    prediction error by placement (requests that ran on one placement only)."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {
        k: {} for k in ("ttft", "ttft_kind", "energy", "energy_kind", "error")
    }
    for r in sorted(records, key=lambda r: r.ended):
        if r.outcome != "ok" or r.metrics is None or not r.placements:
            continue
        stages = _last_attempt(r.placements)
        p, m = stages[0], r.metrics
        where = " + ".join(names.get(s.device_id, s.device_id) if s.device_id else "cloud" for s in stages)
        out["ttft"].setdefault(where, []).append((r.ended, m.ttft_ms))
        out["ttft_kind"].setdefault(p.kind, []).append((r.ended, m.ttft_ms))
        out["energy"].setdefault(where, []).append((r.ended, m.energy_j))
        out["energy_kind"].setdefault(p.kind, []).append((r.ended, m.energy_j))
        if len(stages) == len(r.placements) and p.predicted_ttft_ms > 0:  # no failover: one prediction held
            out["error"].setdefault(where, []).append((r.ended, 100 * (m.ttft_ms / p.predicted_ttft_ms - 1)))
    return out


def _last_attempt(placements: Sequence[pb.Placement]) -> list[pb.Placement]:
    """The placement a request ended on: its last, with the stages before it when it is a split's."""
    out = [placements[-1]]
    for p in reversed(placements[:-1]):
        if not (p.kind == out[0].kind == "split" and p.layer_end == out[0].layer_start > 0):
            break
        out.insert(0, p)
    return out
