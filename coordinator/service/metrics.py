"""Prometheus metrics of one coordinator service, in its own registry (``/metrics``).

xshard_requests_total{outcome}                 jobs' requests by outcome: success, dead_letter,
                                               refused, no_workers, failed
xshard_request_latency_seconds                 a successful request, end to end
xshard_stage_latency_seconds{model,stage}      one stage of a successful request, in its worker
xshard_recovery_events_total{rung}             recovery events of this coordinator's managers by the
                                               ladder's rung (retry, reroute, redistribute, ...)
xshard_live_workers, xshard_queue_depth, xshard_requests_in_flight, xshard_dead_letters,
xshard_coordinators_alive, xshard_warm_managers  fleet gauges, set at each status refresh
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from coordinator.service.status import FleetStatus

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OUTCOMES = ("success", "dead_letter", "refused", "no_workers", "failed")


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("xshard_requests", "Requests of jobs by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.latency = Histogram(
            "xshard_request_latency_seconds", "A request end to end", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.stage_latency = Histogram(
            "xshard_stage_latency_seconds",
            "One stage of a request, in its worker",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.recoveries = Counter("xshard_recovery_events", "Recovery events by ladder rung", ["rung"], registry=r)
        self.live_workers = Gauge("xshard_live_workers", "Workers with a fresh heartbeat", registry=r)
        self.queue_depth = Gauge("xshard_queue_depth", "Jobs in the arq queue (running ones too)", registry=r)
        self.in_flight = Gauge("xshard_requests_in_flight", "Requests accepted, not finished", registry=r)
        self.dead_letters = Gauge("xshard_dead_letters", "Entries in the dead letter", registry=r)
        self.coordinators = Gauge("xshard_coordinators_alive", "Coordinator services alive", registry=r)
        self.warm_managers = Gauge("xshard_warm_managers", "Warm managers in this coordinator", registry=r)

    def record_success(self, model: str, metrics: Mapping[str, Any]) -> None:
        self.requests.labels("success").inc()
        self.latency.observe(float(metrics.get("inference_time_ms", 0.0)) / 1000.0)
        for c in (metrics.get("component_results") or {}).values():
            self.stage_latency.labels(model, str(c["shard_index"])).observe(float(c["worker_ms"]) / 1000.0)

    def record_failure(self, outcome: str) -> None:
        self.requests.labels(outcome if outcome in OUTCOMES else "failed").inc()

    def record_recoveries(self, events: Iterable[Mapping[str, Any]]) -> None:
        for e in events:
            self.recoveries.labels(str(e.get("action", "unknown"))).inc()

    def record_fleet(self, fleet: FleetStatus, warm_managers: int) -> None:
        self.live_workers.set(len(fleet.workers))
        self.queue_depth.set(fleet.queue_depth)
        self.in_flight.set(fleet.requests_in_flight)
        self.dead_letters.set(fleet.dead_letters)
        self.coordinators.set(len(fleet.coordinators))
        self.warm_managers.set(warm_managers)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
