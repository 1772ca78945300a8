"""The fleet page's parts as pure functions: the journal, the router's decision as rows, the SVG plots,
login sessions, and the power figure agents publish. The browser tests are in test_fleet_page.py."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from cloud_hub.errors import BudgetUnsatisfiable
from cloud_hub.fleet import Fleet
from cloud_hub.journal import Journal
from cloud_hub.router import Budget, BudgetRouter
from cloud_hub.ui import plots, views
from cloud_hub.ui.sessions import Sessions, same_secret
from edge_agent.power import PowerSensor, SensorError
from edge_agent.power_meter import PowerGauge
from partitioner.cost import predict
from tandem.v1 import tandem_pb2 as pb
from tests.test_router import CLOUD, COST, CPU, PI

XSS = "<script>alert(1)</script>"


def _open(j: Journal, budget: Budget | None = None):  # type: ignore[no-untyped-def]
    return j.open("", False, 32, 1, budget or Budget(), "")


def test_journal_is_bounded_and_keeps_candidates_only_for_the_newest() -> None:
    j = Journal(size=5, detail=2)
    router = BudgetRouter()
    for _ in range(7):
        rec = _open(j)
        j.routed(rec, router.choose([PI, CPU, CLOUD], 50, 32, Budget()), 50)
    assert [r.id for r in j.records] == ["r3", "r4", "r5", "r6", "r7"]
    assert j.get("r2") is None and j.get("r7") is j.records[-1]
    assert [len(r.considered) for r in j.records] == [0, 0, 0, 3, 3]
    assert [r.id for r in j.recent(2)] == ["r7", "r6"]
    with pytest.raises(ValueError, match="detail"):
        Journal(size=2, detail=3)


def test_kept_compares_every_limit_set_with_what_was_measured() -> None:
    j = Journal()
    cases = [
        (Budget(), 100.0, None),
        (Budget(ttft_ms=120), 100.0, True),
        (Budget(ttft_ms=80), 100.0, False),
        (Budget(ttft_ms=120, energy_j=0.5), 100.0, False),  # energy 1.0 J measured
    ]
    for budget, ttft, kept in cases:
        rec = _open(j, budget)
        j.close(rec, "ok", pb.Metrics(ttft_ms=ttft, tpot_ms=10, energy_j=1.0))
        assert rec.kept is kept, budget
    failed = _open(j, Budget(ttft_ms=1000))
    j.close(failed, "unavailable", error="device gone")
    assert failed.kept is None and failed.outcome == "unavailable"


def test_decision_rows_say_why_each_candidate_lost() -> None:
    j = Journal()
    router = BudgetRouter()
    cloud_ttft = predict(CLOUD.profile, COST, 400, 32).ttft_ms
    edge_ttft = min(predict(c.profile, COST, 400, 32).ttft_ms for c in (PI, CPU))
    budget = Budget(ttft_ms=(cloud_ttft + edge_ttft) / 2)  # only the cloud fits
    rec = _open(j, budget)
    j.routed(rec, router.choose([PI, CPU, CLOUD], 400, 32, budget), 400)
    rows = views.decision_rows(rec, {"pi": "kitchen pi"})
    assert [r.verdict for r in rows] == ["chosen", "ruled out", "ruled out"]
    assert rows[0].where == "cloud"
    assert {r.where for r in rows[1:]} == {"kitchen pi", "cpu"}
    for r in rows[1:]:  # the constraint that ruled it out, and by how much
        ratio = float(re.search(r"TTFT ([\d.]+)× its limit", r.reason).group(1))
        assert ratio > 1.0

    everything = _open(j)  # no budget: all fit, the edge with least energy wins, the rest say why not
    j.routed(everything, router.choose([PI, CPU, CLOUD], 50, 32, Budget()), 50)
    rows = views.decision_rows(everything, {})
    assert [r.verdict for r in rows] == ["chosen", "fits", "fits"]
    reasons = {r.where: r.reason for r in rows[1:]}
    assert reasons["cloud"] == "fits; the edge is preferred to the cloud"
    assert "more edge energy" in next(v for k, v in reasons.items() if k != "cloud")


def test_a_refused_request_keeps_what_the_router_weighed() -> None:
    j = Journal()
    rec = _open(j, Budget(tpot_ms=1e-6))
    with pytest.raises(BudgetUnsatisfiable) as info:
        BudgetRouter().choose([PI, CPU], 50, 32, rec.budget)
    j.refused(rec, info.value.considered, info.value.quantile, 50)
    j.close(rec, info.value.kind, error=str(info.value))
    rows = views.decision_rows(rec, {})
    assert [r.verdict for r in rows] == ["ruled out", "ruled out"]
    assert all("time per token" in r.reason for r in rows)
    assert views.request_rows([rec], {})[0].outcome == "budget_unsatisfiable"


def test_fleet_rows_show_power_source_and_hub_queue() -> None:
    fleet = Fleet()
    fleet.update_telemetry("dev-a", {"load": 0.5, "power_w": 4.25, "power_sensor": "rapl:package-0",
                                     "temperature_c": 51.0})  # fmt: skip
    fleet.update_telemetry("dev-b", {"load": 0.0, "power_w": 0.0, "power_sensor": 7})  # not a string: ignored
    models = [pb.ModelInfo(name="smollm2", engine="cpu", quant="int4")]
    devices = [
        pb.Device(device_id="dev-b", name=XSS, profile="cpu-2core", status="offline", models=models, last_seen_unix=90),
        pb.Device(device_id="dev-a", name="alpha", profile="jetson-orin-nano", status="online", models=models,
                  last_seen_unix=99),
    ]  # fmt: skip
    cloud = pb.ModelInfo(name="gemma3-270m", engine="cpu", quant="source")
    rows = views.fleet_rows(devices, fleet, cloud, "cpu-2core", 2, now=100.0)
    assert [r.device_id for r in rows] == ["cloud", "dev-a", "dev-b"]  # the hub's own, then online first
    assert rows[0].queue == "2 running" and rows[0].models == ("gemma3-270m · cpu · source",)
    assert rows[1].power == "4.2 W measured (rapl:package-0)" and rows[1].temperature == "51 °C"
    assert rows[1].load == "50%" and rows[1].last_seen == "1 s ago" and rows[1].models == ("smollm2 · cpu · int4",)
    assert rows[2].power == "0.0 W estimated" and rows[2].status == "offline" and rows[2].name == XSS


def test_plots_escape_labels_and_scale_to_the_data() -> None:
    svg = str(plots.line_chart("TTFT", "ms", {XSS: [(0.0, 10.0), (1.0, 30.0)], "cloud": [(0.5, 20.0)]}))
    assert "<script" not in svg and "&lt;script&gt;" in svg
    root = ET.fromstring(svg)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    circles = root.findall(f"{ns}circle")
    assert len(circles) == 3
    ys = sorted(float(c.get("cy")) for c in circles)  # 30 highest (smallest y), 10 lowest
    assert ys[0] < ys[1] < ys[2] and ys[2] <= plots.H - plots.BOTTOM
    empty = str(plots.line_chart("Energy", "J", {}))
    assert "no requests yet" in empty and ET.fromstring(empty) is not None


def test_sessions_expire_are_bounded_and_check_csrf_in_constant_time() -> None:
    now = [1000.0]
    s = Sessions(ttl_s=60, limit=2, clock=lambda: now[0])
    a, b = s.create("k1"), s.create("k2")
    assert s.get(a.sid) is a and a.csrf != a.sid and len(a.sid) >= 40
    c = s.create("k3")  # past the limit: the oldest ends
    assert s.get(a.sid) is None and s.get(b.sid) is b and s.get(c.sid) is c
    now[0] += 61
    assert s.get(b.sid) is None and s.get(None) is None and s.get("") is None
    assert same_secret(c.csrf, c.csrf) and not same_secret(c.csrf, c.csrf[:-1]) and not same_secret(c.csrf, None)
    assert not same_secret("", "")


class _Counter(PowerSensor):
    kind, name, has_counter = "fake", "fake:counter", True

    def __init__(self) -> None:
        self.joules: list[float] = [100.0, 112.0, 50.0]

    @classmethod
    def discover(cls, root):  # type: ignore[no-untyped-def]
        return []

    def energy_j(self) -> float:
        if not self.joules:
            raise SensorError("/sys/fake/energy_uj", "gone")
        return self.joules.pop(0)


def test_power_gauge_turns_a_counter_into_watts() -> None:
    times = iter([0.0, 4.0, 8.0, 12.0])
    gauge = PowerGauge(_Counter(), clock=lambda: next(times))
    assert gauge.read() is None  # no interval yet
    assert gauge.read() == pytest.approx(3.0)  # 12 J over 4 s
    assert gauge.read() is None  # the counter went backwards (a reset): no figure rather than a wrong one
    assert gauge.read() is None  # unreadable: None, logged


def test_series_group_served_requests_by_device_and_kind() -> None:
    j = Journal()
    edge = pb.Placement(kind="edge", device_id="dev-a", predicted_ttft_ms=50.0)
    cloud = pb.Placement(kind="cloud", predicted_ttft_ms=20.0)
    for placements, ttft in (((edge,), 60.0), ((cloud,), 10.0), ((edge, cloud), 90.0)):
        rec = _open(j)
        j.placed(rec, placements)
        j.close(rec, "ok", pb.Metrics(ttft_ms=ttft, energy_j=1.0))
    j.close(_open(j), "unavailable", error="gone")  # not served: in no plot
    data = views.series(list(j.records), {"dev-a": "alpha"})
    assert [v for _, v in data["ttft"]["alpha"]] == [60.0]
    assert [v for _, v in data["ttft"]["cloud"]] == [10.0, 90.0]  # a failover counts where it ended
    assert [v for _, v in data["ttft_kind"]["cloud"]] == [10.0, 90.0]
    assert data["error"]["alpha"][0][1] == pytest.approx(20.0) and data["error"]["cloud"][0][1] == pytest.approx(-50.0)
    assert len(data["error"]["cloud"]) == 1  # the failover's prediction was of another placement
    split = _open(j)
    j.placed(split, (pb.Placement(kind="split", device_id="dev-a", layer_start=0, layer_end=8, predicted_ttft_ms=40.0),
                     pb.Placement(kind="split", layer_start=8, layer_end=30, predicted_ttft_ms=40.0)))  # fmt: skip
    j.close(split, "ok", pb.Metrics(ttft_ms=50.0, energy_j=0.5))
    data = views.series(list(j.records), {"dev-a": "alpha"})
    assert [v for _, v in data["ttft"]["alpha + cloud"]] == [50.0] and [v for _, v in data["ttft_kind"]["split"]] == [
        50.0
    ]
    assert data["error"]["alpha + cloud"][0][1] == pytest.approx(25.0)


def test_a_split_is_one_line_and_a_failover_starts_the_next() -> None:
    stages = [
        pb.Placement(kind="split", device_id="dev-a", profile="cpu-2core", layer_start=0, layer_end=8),
        pb.Placement(kind="split", profile="cloud-cpu-2core", layer_start=8, layer_end=30),
        pb.Placement(kind="edge", device_id="dev-b", profile="cpu-2core"),
    ]
    lines = views.attempts(stages, {"dev-a": "alpha"})
    assert lines == (
        "split: alpha (cpu-2core, layers 0–8) + cloud (cloud-cpu-2core, layers 8–30)",
        "edge: dev-b (cpu-2core)",
    )


def test_the_front_keeps_the_points_nothing_beats() -> None:
    pts = [(1.0, 5.0), (2.0, 2.0), (3.0, 3.0), (4.0, 1.0), (2.0, 2.0)]
    assert plots.front(pts) == [True, True, False, True, True]  # (3, 3) is beaten by (2, 2); ties stay
    svg = str(plots.scatter("x", "ms", "J", [(f"k={i}", a, b) for i, (a, b) in enumerate(pts)], "k=2"))
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert [c.get("class") for c in root.findall(f"{ns}circle")].count("front") == 4
    assert len([c for c in root.findall(f"{ns}circle") if c.get("class") == "marked"]) == 1
