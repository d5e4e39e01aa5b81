"""What the coordinator knows about workers: who serves which stage, who is alive (heartbeat), and the
circuit breakers that take failing workers and (browser, platform) pairs out of allocation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from broker.registry import WorkerInfo
from coordinator.recovery import Breakers


@dataclass
class Fleet:
    heartbeat_timeout_ms: int
    serving: dict[int, list[str]] = field(default_factory=dict)  # stage index -> worker ids
    live: dict[str, WorkerInfo] = field(default_factory=dict)  # worker id -> registration
    dead: set[str] = field(default_factory=set)
    breakers: Breakers = field(default_factory=Breakers)

    def update(self, live: list[WorkerInfo]) -> tuple[list[str], list[str]]:
        """Take a fresh registry read; return (workers found dead, workers back to life)."""
        now = {w.worker_id: w for w in live}
        known = {wid for ids in self.serving.values() for wid in ids}
        died = sorted(wid for wid in known if wid not in now and wid not in self.dead)
        revived = sorted(wid for wid in self.dead if wid in now)
        self.dead |= set(died)
        self.dead -= set(revived)
        self.live = now
        return died, revived

    def add(self, stage_index: int, worker_id: str) -> None:
        ids = self.serving.setdefault(stage_index, [])
        if worker_id not in ids:
            ids.append(worker_id)

    def stages_of(self, worker_id: str) -> list[int]:
        return sorted(i for i, ids in self.serving.items() if worker_id in ids)

    def usable(self, worker_id: str, now_s: float | None = None) -> bool:
        info = self.live.get(worker_id)
        if info is None or worker_id in self.dead:
            return False
        now_s = time.monotonic() if now_s is None else now_s
        key = (info.browser, info.execution_provider)
        return self.breakers.allows(worker_id, now_s) and self.breakers.allows(key, now_s)

    def replicas(self, stage_index: int, exclude: str) -> tuple[str, ...]:
        return tuple(w for w in self.serving.get(stage_index, []) if w != exclude and self.usable(w))

    def spares(self, stage_index: int, exclude: str) -> tuple[str, ...]:
        holding = set(self.serving.get(stage_index, []))
        return tuple(sorted(w for w in self.live if w not in holding and w != exclude and self.usable(w)))

    def platforms(self, worker_id: str) -> tuple[str, ...]:
        info = self.live.get(worker_id)
        return info.platforms() if info else ("wasm",)

    def browser(self, worker_id: str) -> str:
        info = self.live.get(worker_id)
        return info.browser if info else ""

    def provider(self, worker_id: str) -> str:
        """The execution provider a live worker's page picked ("" if unknown)."""
        info = self.live.get(worker_id)
        return info.execution_provider if info else ""

    def record(self, worker_id: str, platform: str, ok: bool) -> None:
        now_s = time.monotonic()
        self.breakers.record(worker_id, ok, now_s)
        self.breakers.record((self.browser(worker_id), platform), ok, now_s)
