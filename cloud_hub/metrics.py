"""Prometheus metrics of one hub (own registry, so several hubs in one process stay apart)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
"""Seconds; MoE²'s serving overhead target is 5 ms (issue 17)."""
_RATIO_BUCKETS = (0.5, 0.75, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2, 3, 5)


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tandem_requests", "Requests by final placement kind and outcome", ["placement", "outcome"], registry=r
        )
        self.failovers = Counter("tandem_failovers", "Placements that failed mid-request and were replaced", registry=r)
        self.ttft = Histogram(
            "tandem_ttft_seconds",
            "Time to first token, measured at the hub",
            ["placement"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "tandem_tpot_seconds",
            "Mean time per output token after the first",
            ["placement"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("tandem_requests_inflight", "Requests being served now", registry=r)
        self.queued = Gauge(
            "tandem_requests_queued", "Requests held at the hub for a free slot on their device", registry=r
        )  # read when scraped (HubService sets its function): nothing per request
        self.devices_online = Gauge("tandem_devices_online", "Devices with an open work channel", registry=r)
        self.telemetry_lag = Gauge(
            "tandem_telemetry_lag_seconds", "Age of the oldest latest-telemetry among online devices", registry=r
        )
        self.telemetry_messages = Counter("tandem_telemetry_messages", "Telemetry messages ingested", registry=r)
        self.prediction_ratio = Histogram(
            "tandem_prediction_ratio",
            "Measured over predicted TTFT and time per token, by device (1 = exact; the device's own queue is in both)",
            ["device", "metric"],
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.budgets = Counter(
            "tandem_budget_requests",
            "Served requests that set a budget, by placement kind and whether every limit they set was kept"
            " (measured at the hub)",
            ["placement", "kept"],
            registry=r,
        )
        self.moe2_overhead = Histogram(
            "tandem_moe2_overhead_seconds",
            "MoE² routing overhead per request, from the router's call to its choice (candidates weighed, cached"
            " selection, the prompt's features and gate), by the gate weights' source (a feature kind, or prior)",
            ["features"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self._children: dict[tuple[int, tuple[str, ...]], Counter | Histogram] = {}

    def observe_request(self, placement: str, outcome: str, ttft_ms: float = 0.0, tpot_ms: float = 0.0) -> None:
        self._series(self.requests, placement, outcome).inc()
        if outcome == "ok":
            self._series(self.ttft, placement).observe(ttft_ms / 1000)
            if tpot_ms:
                self._series(self.tpot, placement).observe(tpot_ms / 1000)

    def observe_prediction(self, device: str, placement: Any, metrics: Any) -> None:
        """One request's measured over predicted TTFT and TPOT (pb.Placement, pb.Metrics)."""
        if placement.predicted_ttft_ms > 0 and metrics.ttft_ms > 0:
            self._series(self.prediction_ratio, device, "ttft").observe(metrics.ttft_ms / placement.predicted_ttft_ms)
        if placement.predicted_tpot_ms > 0 and metrics.tpot_ms > 0:
            self._series(self.prediction_ratio, device, "tpot").observe(metrics.tpot_ms / placement.predicted_tpot_ms)

    def observe_budget(self, placement: str, budget: Any, metrics: Any) -> None:
        """Whether a served request kept every limit its budget set (tandem.types.Budget, pb.Metrics):
        TTFT and TPOT as the hub measured them, energy as the answer reports it."""
        limits = (
            (budget.ttft_ms, metrics.ttft_ms),
            (budget.tpot_ms, metrics.tpot_ms),
            (budget.energy_j, metrics.energy_j),
        )
        if any(limit > 0 for limit, _ in limits):
            kept = all(value <= limit for limit, value in limits if limit > 0)
            self._series(self.budgets, placement, "yes" if kept else "no").inc()

    def observe_moe2_overhead(self, seconds: float, features: str) -> None:
        """One MoE² choice's overhead (cloud_hub.moe2_router.Moe2Router.observe)."""
        self._series(self.moe2_overhead, features).observe(seconds)

    def _series(self, metric: Counter | Histogram, *labels: str) -> Any:
        """metric.labels(*labels), looked up once: labels() validates and takes a lock on every call."""
        key = (id(metric), labels)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = metric.labels(*labels)
        return series

    def refresh(self, online: int, telemetry_times: list[float], now: Callable[[], float] = time.time) -> None:
        """Update the gauges that are sampled rather than counted."""
        self.devices_online.set(online)
        self.telemetry_lag.set(max((now() - t for t in telemetry_times), default=0.0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
