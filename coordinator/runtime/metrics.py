"""Live counters of what this manager measured, shaped as the guide's performance history."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.events import RecoveryEvent
from coordinator.history.summary import counter_shape

TIMELINE_LENGTH = 1000


@dataclass
class Counter:
    success_count: int = 0
    error_count: int = 0
    total_latency: float = 0.0
    execution_count: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    def add(self, ok: bool, latency_ms: float | None) -> None:
        self.execution_count += 1
        if ok:
            self.success_count += 1
        else:
            self.error_count += 1
        if ok and latency_ms is not None:
            self.total_latency += latency_ms
            self.latencies.append(latency_ms)

    def as_dict(self) -> dict[str, Any]:
        lat = np.array(self.latencies) if self.latencies else None
        p50 = float(np.percentile(lat, 50)) if lat is not None else 0.0
        p95 = float(np.percentile(lat, 95)) if lat is not None else 0.0
        return counter_shape(self.success_count, self.error_count, self.total_latency, self.execution_count, p50, p95)


class LiveMetrics:
    def __init__(self, shard_type: str) -> None:
        self.shard_type = shard_type
        self.stage_kinds: dict[int, str] = {}  # shard index -> what it holds ("attention", ...); set once planned
        self.requests = Counter()
        self.components: dict[str, Counter] = {}
        self.component_info: dict[str, dict[str, Any]] = {}
        self.browsers: dict[str, Counter] = {}
        self.platforms: dict[str, Counter] = {}
        self.shard_types: dict[str, Counter] = {}
        self.timeline: deque[dict[str, Any]] = deque(maxlen=TIMELINE_LENGTH)
        self.recovery_events: list[dict[str, Any]] = []

    def record_recovery(self, event: RecoveryEvent) -> dict[str, Any]:
        """A recovery event (a request's or a generation session's) as the live history shows it."""
        entry = {
            "timestamp": event.ts_ms / 1000.0,
            "event_id": event.event_id,
            "request_id": event.request_id,
            "plan_id": event.plan_id,
            "shard_index": event.shard_index,
            "worker_id": event.worker_id,
            "browser": event.browser,
            "platform": event.platform,
            "failure": event.failure,
            "action": event.action,
            "success": event.success,
            "duration_ms": round(event.duration_ms, 3),
            "error": event.error[:300],
        }
        self.recovery_events.append(entry)
        return entry

    def record_component(self, component_id: str, info: dict[str, Any], ok: bool, kernel_ms: float | None) -> None:
        kind = self.stage_kinds.get(info.get("shard_index", -1), "")
        self.components.setdefault(component_id, Counter()).add(ok, kernel_ms)
        self.component_info[component_id] = {**info, "kind": kind}
        self.browsers.setdefault(info["browser"], Counter()).add(ok, kernel_ms)
        self.platforms.setdefault(info["platform"], Counter()).add(ok, kernel_ms)
        # by kind where shards hold one, as the history database groups them
        self.shard_types.setdefault(kind or self.shard_type, Counter()).add(ok, kernel_ms)

    def record_request(self, request_id: str, ok: bool, latency_ms: float, error: str | None = None) -> None:
        self.requests.add(ok, latency_ms)
        entry: dict[str, Any] = {
            "timestamp": time.time(),
            "request_id": request_id,
            "success": ok,
            "latency_ms": round(latency_ms, 3),
        }
        if error:
            entry["error"] = error
        self.timeline.append(entry)

    def history(self) -> dict[str, Any]:
        components = {}
        for cid, counter in self.components.items():
            components[cid] = {**counter.as_dict(), **self.component_info[cid]}
        return {
            "components": components,
            "browser_metrics": {b: c.as_dict() for b, c in self.browsers.items()},
            "platform_metrics": {p: c.as_dict() for p, c in self.platforms.items()},
            "overall_metrics": self.requests.as_dict(),
            "shard_types": {s: c.as_dict() for s, c in self.shard_types.items()},
            "timeline": list(self.timeline),
            "recovery_events": list(self.recovery_events),
        }
