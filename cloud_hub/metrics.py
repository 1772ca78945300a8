"""Prometheus metrics of one hub (own registry, so several hubs in one process stay apart)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


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
        self._children: dict[tuple[int, tuple[str, ...]], Counter | Histogram] = {}

    def observe_request(self, placement: str, outcome: str, ttft_ms: float = 0.0, tpot_ms: float = 0.0) -> None:
        self._series(self.requests, placement, outcome).inc()
        if outcome == "ok":
            self._series(self.ttft, placement).observe(ttft_ms / 1000)
            if tpot_ms:
                self._series(self.tpot, placement).observe(tpot_ms / 1000)

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
