"""Liveness: a worker whose heartbeat lapses, or that ``Liveness`` finds gone sooner (its process exited,
its named connections to the broker closed), is dead to the coordinator. Its jobs are claimed at once
(XCLAIM into the recovery consumer) and recovered; a stage left with no live worker is loaded onto a
healthy one (the pure ``decide_orphan`` says which). A periodic sweep (XAUTOCLAIM, ``min_idle_ms``)
catches jobs stuck with a live worker.

The monitor ticks every ``interval_s`` until ``stop()`` (``run_until_stopped``); a tick that meets a
broker outage is tried again with backoff (``broker.retry.retrying``) until it succeeds or the monitor
is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from broker.keys import STAGE_GROUP
from broker.kinds import FailureKind, RecoveryAction
from broker.messages import StageHop
from broker.retry import Stopped, poll, retrying
from broker.streams import Broker
from coordinator.recovery import decide_orphan
from coordinator.runtime.fleet import Fleet
from coordinator.runtime.liveness import Liveness
from coordinator.runtime.recoverer import Recoverer

log = logging.getLogger(__name__)

Assign = Callable[[int, str], Awaitable[bool]]


class Monitor:
    def __init__(
        self,
        broker: Broker,
        fleet: Fleet,
        recoverer: Recoverer,
        route: tuple[str, ...],
        assign: Assign,
        interval_s: float,
        sweep_interval_s: float,
        min_idle_ms: int,
        *,
        liveness: Liveness | None = None,
    ) -> None:
        self.broker = broker
        self.fleet = fleet
        self.recoverer = recoverer
        self.route = route
        self._assign = assign
        self.interval_s = interval_s
        self.sweep_interval_s = sweep_interval_s
        self.min_idle_ms = min_idle_ms
        self.liveness = liveness
        self._why: dict[str, str] = {}  # worker id -> why it was found dead before its heartbeat lapsed
        self._last_sweep = time.monotonic()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """End ``run_until_stopped`` at its next step (redis-py can turn a cancellation into a connection
        error, so cancelling the task alone is not enough)."""
        self._stop.set()

    async def run_until_stopped(self) -> None:
        """Tick every ``interval_s`` until ``stop()``; a failed tick is logged and the next one comes."""
        with contextlib.suppress(Stopped):
            async for _ in poll(self.interval_s, self._stop):
                try:
                    await retrying(self.tick, what="monitor tick", stop=self._stop)
                except Stopped:
                    raise
                except Exception:  # the monitor must outlive one failed tick
                    log.exception("monitor: tick failed")

    async def tick(self) -> None:
        now_ms = int(time.time() * 1000)
        live = await self.broker.live_workers(now_ms, self.fleet.heartbeat_timeout_ms)
        if self.liveness is not None:
            self._why = await self.liveness.gone(live)
            live = [w for w in live if w.worker_id not in self._why]
        died, revived = self.fleet.update(live)
        for wid in revived:
            log.warning("worker %s is alive again", wid)
        for wid in died:
            await self._reclaim(wid, FailureKind.WORKER_LOST)
        if died:
            await self._cover_orphaned_stages(died)
        if time.monotonic() - self._last_sweep >= self.sweep_interval_s:
            self._last_sweep = time.monotonic()
            await self._sweep()

    def _streams_of(self, worker_id: str) -> list[str]:
        return [self.route[i] for i in self.fleet.stages_of(worker_id)] + [self.broker.keys.direct(worker_id)]

    async def _reclaim(self, worker_id: str, kind: FailureKind) -> None:
        """A lost worker's jobs go to the recovery policy; a generation session's hops are left in the stream
        for their session, whose own decision (``recovery.session``) moves them to the stage's new holder."""
        why = self._why.get(worker_id) or f"heartbeat lapsed (> {self.fleet.heartbeat_timeout_ms} ms)"
        log.warning("worker %s: %s; reclaiming its jobs", worker_id, why)
        for stream in self._streams_of(worker_id):
            for d, deliveries in await self.broker.claim_from(stream, STAGE_GROUP, worker_id, self.recoverer.claimer):
                if _of_a_session(d.message):
                    continue
                if isinstance(d.message, StageHop):
                    log.warning(
                        "request %s stage %d: claimed from %s (delivery %d)",
                        d.message.request_id,
                        d.message.stage_index,
                        worker_id,
                        deliveries,
                    )
                    await self.recoverer.on_claimed(d.stream, d.entry_id, d.message, kind, worker_id)
                else:
                    await self.broker.ack(d.stream, STAGE_GROUP, d.entry_id)
        # jobs routed to this worker alone (retries) that it never read: it was their only reader
        direct = self.broker.keys.direct(worker_id)
        for d in await self.broker.read_group(STAGE_GROUP, self.recoverer.claimer, [direct], count=1000, block_ms=None):
            if _of_a_session(d.message):
                continue
            if isinstance(d.message, StageHop):
                log.warning(
                    "request %s stage %d: unread on lost %s; recovering",
                    d.message.request_id,
                    d.message.stage_index,
                    worker_id,
                )
                await self.recoverer.on_claimed(d.stream, d.entry_id, d.message, kind, worker_id)
            else:
                await self.broker.ack(d.stream, STAGE_GROUP, d.entry_id)

    async def _cover_orphaned_stages(self, died: list[str]) -> None:
        """A stage with no live worker gets one: load its shard onto a spare (``decide_orphan`` picks them)."""
        for index in range(len(self.route)):
            lost = [w for w in died if index in self.fleet.stages_of(w)]
            plan = decide_orphan(index, self.fleet.replicas(index, ""), self.fleet.spares(index, ""), lost)
            if plan is None:
                continue
            started, ok = time.monotonic(), False
            for target in plan.tries:
                log.warning("stage %d has no live worker; loading its shard onto %s", index, target.worker_id)
                if await self._assign(index, target.worker_id):
                    ok = True
                    break
            if not plan.tries:
                log.error("%s", plan.reason)
            action = RecoveryAction.REDISTRIBUTE
            self.recoverer.note(index, plan.lost_worker, FailureKind.WORKER_LOST, action, ok, started, plan.reason)

    async def _sweep(self) -> None:
        streams = list(self.route) + sorted(
            {self.broker.keys.direct(w) for ids in self.fleet.serving.values() for w in ids}
        )
        for stream in streams:
            for d in await self.broker.claim_stale(stream, STAGE_GROUP, self.recoverer.claimer, self.min_idle_ms):
                if _of_a_session(d.message):
                    continue
                if isinstance(d.message, StageHop):
                    await self.recoverer.on_claimed(d.stream, d.entry_id, d.message, FailureKind.TIMEOUT, "")
                else:
                    await self.broker.ack(d.stream, STAGE_GROUP, d.entry_id)


def _of_a_session(msg: object) -> bool:
    """A generation session's hop: its session decides its recovery (and moves it), not the job policy."""
    return isinstance(msg, StageHop) and msg.is_session
