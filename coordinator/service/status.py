"""The operator's view of one namespace: workers, stages, requests, dead letters, the job queue and the
coordinators alive, read from Redis in one pass (``read_fleet``) into frozen rows.

Circuit breakers live in each coordinator's managers, not in Redis: a coordinator's status page shows
its own (``breakers=``); ``xshard status`` from elsewhere shows ``-``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis

from broker.keys import STAGE_GROUP
from broker.ledger import Ledger
from broker.registry import WorkerInfo
from broker.streams import Broker
from coordinator.history.report import format_table
from coordinator.service.queue import CoordinatorHealth, coordinators_alive, queue_depth

HEARTBEAT_MAX_AGE_MS = 2000


@dataclass(frozen=True, slots=True)
class WorkerRow:
    worker_id: str
    browser: str
    platform: str
    execution_provider: str
    adapter: str
    state: str
    shards: tuple[str, ...]  # "plan:index" of each stage served
    heartbeat_age_ms: int
    breaker: str  # closed | open | half_open, or "-" when this process holds no breaker for it


@dataclass(frozen=True, slots=True)
class StageRow:
    stream: str
    plan_id: str
    index: int
    backlog: int  # entries not yet delivered to a worker
    pending: int  # delivered, not acknowledged
    consumers: int  # live workers serving it


@dataclass(frozen=True, slots=True)
class FleetStatus:
    ts_ms: int
    namespace: str
    workers: tuple[WorkerRow, ...]
    stages: tuple[StageRow, ...]
    requests_in_flight: int
    dead_letters: int
    queue_depth: int
    jobs_running: int
    coordinators: tuple[CoordinatorHealth, ...]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stage_of(prefix: str, stream: str) -> tuple[str, int]:
    plan_id, _, index = stream[len(prefix) :].rpartition(":")
    return plan_id, int(index) if index.isdigit() else -1


def _worker_row(w: WorkerInfo, prefix: str, now_ms: int, breakers: Mapping[str, str]) -> WorkerRow:
    shards = tuple(f"{plan[:12]}:{i}" for plan, i in (_stage_of(prefix, s) for s in w.stages))
    return WorkerRow(
        worker_id=w.worker_id,
        browser=w.browser,
        platform=w.platform,
        execution_provider=w.execution_provider,
        adapter=w.adapter,
        state=str(w.state.value),
        shards=shards,
        heartbeat_age_ms=max(0, now_ms - w.heartbeat_ms),
        breaker=breakers.get(w.worker_id, "-"),
    )


async def _stages(broker: Broker, live: list[WorkerInfo]) -> list[StageRow]:
    prefix = broker.keys.stage("", 0).removesuffix(":0")
    streams = set(await broker.scan_keys(f"{prefix}*")) | {s for w in live for s in w.stages}
    rows = []
    for stream in sorted(streams):
        length = await broker.stream_length(stream)
        pending = await broker.pending_count(stream, STAGE_GROUP)
        plan_id, index = _stage_of(prefix, stream)
        consumers = sum(1 for w in live if stream in w.stages)
        rows.append(StageRow(stream, plan_id, index, max(0, length - pending), pending, consumers))
    return rows


async def _in_flight(broker: Broker, ledger: Ledger) -> int:
    prefix = broker.keys.inflight("")
    total = 0
    for key in await broker.scan_keys(f"{prefix}*"):
        total += len(await ledger.inflight(key[len(prefix) :]))
    return total


async def read_fleet(
    broker: Broker,
    redis: ArqRedis,
    breakers: Mapping[str, str] | None = None,
    heartbeat_max_age_ms: int = HEARTBEAT_MAX_AGE_MS,
) -> FleetStatus:
    now_ms = int(time.time() * 1000)
    live = await broker.live_workers(now_ms, heartbeat_max_age_ms)
    ns = broker.keys.ns
    prefix = broker.keys.stage("", 0).removesuffix(":0")
    coordinators = await coordinators_alive(redis, ns)
    return FleetStatus(
        ts_ms=now_ms,
        namespace=ns,
        workers=tuple(_worker_row(w, prefix, now_ms, breakers or {}) for w in live),
        stages=tuple(await _stages(broker, live)),
        requests_in_flight=await _in_flight(broker, Ledger(broker)),
        dead_letters=await broker.stream_length(broker.keys.dead),
        queue_depth=await queue_depth(redis, ns),
        jobs_running=sum(c.jobs_ongoing for c in coordinators),
        coordinators=tuple(coordinators),
    )


def format_fleet(s: FleetStatus) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.ts_ms / 1000))
    lines = [
        f"namespace {s.namespace} at {when}: {len(s.workers)} live workers, {len(s.coordinators)} coordinators, "
        f"{s.queue_depth} jobs queued ({s.jobs_running} running), {s.requests_in_flight} requests in flight, "
        f"{s.dead_letters} dead letters",
        "",
        "workers",
    ]
    w_rows = [
        (
            w.worker_id,
            w.browser,
            w.execution_provider or w.platform,
            w.adapter[:30] or "-",
            w.state,
            " ".join(w.shards) or "-",
            w.heartbeat_age_ms,
            w.breaker,
        )
        for w in s.workers
    ]
    w_heads = ("worker", "browser", "platform", "adapter", "state", "shards", "heartbeat ms", "breaker")
    lines.append(format_table(w_heads, w_rows) if w_rows else "  none alive")
    lines += ["", "stages"]
    st_rows = [(f"{st.plan_id[:12]}:{st.index}", st.backlog, st.pending, st.consumers) for st in s.stages]
    lines.append(format_table(("stage", "backlog", "pending", "consumers"), st_rows) if st_rows else "  none")
    lines += ["", "coordinators"]
    c_rows = [(c.service_id, c.jobs_ongoing, c.jobs_complete, c.jobs_failed, c.jobs_retried) for c in s.coordinators]
    c_heads = ("coordinator", "running", "complete", "failed", "retried")
    lines.append(format_table(c_heads, c_rows) if c_rows else "  none alive")
    return "\n".join(lines)
