"""Carrying out recovery: the one place where failed stages are tried again.

A failure reaches it two ways: a worker hands a job back (``StageFailure`` on the reply stream:
kernel error, lost browser, timeout), or the monitor claims a job from a worker that died or hung
(XCLAIM into this coordinator's recovery consumer). Either way the pure ``Policy.decide`` picks the
rung; this module gathers the options, acts (re-enqueue, restart, reroute, change platform, load the
shard elsewhere, dead-letter) and records a recovery event that closes when the request ends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from broker.keys import STAGE_GROUP
from broker.kinds import FailureKind, RecoveryAction
from broker.ledger import Ledger
from broker.messages import RecoveryEvent, Restart, StageFailure, StageHop
from broker.streams import Broker
from coordinator.recovery import (
    ChangePlatform,
    DeadLetter,
    Decision,
    Failure,
    Options,
    Policy,
    Redistribute,
    Reroute,
    Retry,
    StageHistory,
    counts_against_worker,
)
from coordinator.recovery import Restart as RestartDecision
from coordinator.runtime.fleet import Fleet
from coordinator.runtime.metrics import LiveMetrics
from coordinator.runtime.requests import RequestTracker

log = logging.getLogger(__name__)

Assign = Callable[[int, str], Awaitable[bool]]


@dataclass
class OpenRecovery:
    failure: FailureKind
    action: RecoveryAction
    worker_id: str
    browser: str
    platform: str
    shard_index: int
    error: str
    started_s: float
    ts_ms: float


class Recoverer:
    def __init__(
        self,
        *,
        broker: Broker,
        ledger: Ledger,
        fleet: Fleet,
        policy: Policy,
        tracker: RequestTracker,
        metrics: LiveMetrics,
        assign: Assign,
        coordinator_id: str,
        model_name: str,
        plan_id: str,
    ) -> None:
        self.broker = broker
        self.ledger = ledger
        self.fleet = fleet
        self.policy = policy
        self.tracker = tracker
        self.metrics = metrics
        self._assign = assign
        self.coordinator_id = coordinator_id
        self.claimer = f"recovery:{coordinator_id}"
        self.model_name = model_name
        self.plan_id = plan_id
        self.max_attempts: dict[str, int] = {}  # request id -> attempts allowed per stage (max_retries + 1)
        self._histories: dict[tuple[str, int], StageHistory] = {}
        self._open: dict[str, list[OpenRecovery]] = {}
        self._rng = random.Random()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- entry points ----------------------------------------------------------------------------

    async def on_failure(self, f: StageFailure, entry: tuple[str, str]) -> None:
        """A worker handed a job back (reply stream)."""
        job = f.as_hop(time.time() * 1000.0)
        self.metrics.record_component(
            f"shard_{f.stage_index}",
            {
                "browser": self.fleet.browser(f.worker_id) or "unknown",
                "platform": f.platform or "unknown",
                "shard_type": self.metrics.shard_type,
                "shard_index": f.stage_index,
                "worker_id": f.worker_id,
            },
            False,
            None,
        )
        if f.route:
            await self.recover(job, f.kind, f.worker_id, f.platform, f.error, None)
        else:
            log.error("request %s: failure without a route cannot be recovered: %s", f.request_id, f.error)
        await self.broker.ack(entry[0], "coordinator", entry[1])

    async def on_claimed(self, stream: str, entry_id: str, job: StageHop, kind: FailureKind, worker_id: str) -> None:
        """The monitor claimed a job held by a worker that died or hung."""
        platform = self.fleet.provider(worker_id)
        await self.recover(job, kind, worker_id, platform, f"worker {worker_id} {kind}", (stream, entry_id))

    def note(
        self,
        shard_index: int,
        worker_id: str,
        failure: FailureKind,
        action: RecoveryAction,
        ok: bool,
        started_s: float,
        error: str,
    ) -> None:
        """Record a recovery that belongs to no single request (a stage left without a worker)."""
        rec = OpenRecovery(
            failure,
            action,
            worker_id,
            self.fleet.browser(worker_id),
            "",
            shard_index,
            error,
            started_s,
            time.time() * 1000.0,
        )
        self._record_event("", rec, ok, (time.monotonic() - started_s) * 1000.0)

    def finished(self, request_id: str, ok: bool) -> None:
        """Close the request's open recovery events (its completion is their end)."""
        for key in [k for k in self._histories if k[0] == request_id]:
            del self._histories[key]
        self.max_attempts.pop(request_id, None)
        for rec in self._open.pop(request_id, []):
            self._record_event(request_id, rec, ok, (time.monotonic() - rec.started_s) * 1000.0)

    # -- the decision and the action ---------------------------------------------------------------

    async def recover(
        self, job: StageHop, kind: FailureKind, worker_id: str, platform: str, error: str, src: tuple[str, str] | None
    ) -> None:
        stage = job.stage_index
        browser = self.fleet.browser(worker_id)
        if counts_against_worker(kind) and worker_id:
            self.fleet.record(worker_id, platform, ok=False)
        failure = Failure(
            request_id=job.request_id,
            stage_index=stage,
            worker_id=worker_id or None,
            browser=browser or None,
            platform=platform or None,
            kind=kind,
            error=error,
            attempt=max(1, job.attempt),
            attempt_limit=self.max_attempts.get(job.request_id),
        )
        history = self._histories.get((job.request_id, stage), StageHistory())
        decision = self.policy.decide(failure, history, self._options(stage, worker_id), self._rng)
        started = time.monotonic()
        action = RecoveryAction(decision.rung.name.lower())
        rec = OpenRecovery(kind, action, worker_id, browser, platform, stage, error, started, time.time() * 1000.0)
        self._open.setdefault(job.request_id, []).append(rec)
        log.warning("request %s stage %d: %s on %s -> %s", job.request_id, stage, kind, worker_id or "?", decision)
        if isinstance(decision, DeadLetter):
            await self._bury(job, decision.reason, error, history, src)
            return
        self._histories[(job.request_id, stage)] = history.record(failure, decision)
        dst, target_platform = await self._act(decision, job)
        if dst is None:
            await self._bury(job, f"recovery could not act on {decision}", error, history, src)
            return
        retry = job.again(stage, target_platform, time.time() * 1000.0)
        if src is not None:
            await self.broker.hand_off(src[0], STAGE_GROUP, src[1], self.claimer, dst, retry)
        else:
            await self.broker.add(dst, retry)
        if self.policy.runs_in_parallel:
            second = next((w for w in self.fleet.replicas(stage, worker_id) if self.broker.keys.direct(w) != dst), None)
            twin = job.route[stage] if second is None else self.broker.keys.direct(second)
            if twin != dst:
                await self.broker.add(twin, retry)

    async def _act(self, decision: Decision, job: StageHop) -> tuple[str | None, str]:
        keys = self.broker.keys
        if isinstance(decision, Retry):
            await asyncio.sleep(decision.delay_s)
            return (keys.direct(decision.worker_id) if decision.worker_id else job.route[job.stage_index]), ""
        if isinstance(decision, RestartDecision):
            restart = Restart(f"recovery of request {job.request_id}", since_ms=job.enqueued_ms)
            await self.broker.add(keys.control(decision.worker_id), restart)
            return keys.direct(decision.worker_id), ""
        if isinstance(decision, Reroute):
            return keys.direct(decision.worker_id), ""
        if isinstance(decision, ChangePlatform):
            return keys.direct(decision.worker_id), decision.platform
        if isinstance(decision, Redistribute):
            ok = await self._assign(job.stage_index, decision.worker_id)
            return (keys.direct(decision.worker_id) if ok else None), ""
        return None, ""

    def _options(self, stage: int, worker_id: str) -> Options:
        replicas = self.fleet.replicas(stage, worker_id)
        alternatives = [(w, p) for w in (worker_id, *replicas) if w for p in self.fleet.platforms(w)]
        alive = worker_id in self.fleet.live and worker_id not in self.fleet.dead
        return Options(
            replicas=replicas,
            spare_workers=self.fleet.spares(stage, worker_id),
            alternative_platforms=tuple(alternatives),
            restartable=alive,  # whether the failure calls for a restart is the policy's rule (may_restart)
            page_budgets_bytes=tuple(
                (w, i.page_budget_bytes) for w, i in self.fleet.live.items() if i.page_budget_bytes
            ),
        )

    async def _bury(
        self, job: StageHop, reason: str, error: str, history: StageHistory, src: tuple[str, str] | None
    ) -> None:
        dead = job.buried(reason, error, history.workers_tried, time.time() * 1000.0)
        await self.ledger.bury(dead, self.coordinator_id)
        if src is not None:
            await self.broker.ack(src[0], STAGE_GROUP, src[1])
        log.error("request %s stage %d dead-lettered: %s", job.request_id, job.stage_index, reason)
        self.tracker.dead(dead)
        self.finished(job.request_id, ok=False)

    def _record_event(self, request_id: str, rec: OpenRecovery, ok: bool, duration_ms: float) -> None:
        event = RecoveryEvent(
            event_id=uuid.uuid4().hex,
            ts_ms=rec.ts_ms,
            request_id=request_id,
            plan_id=self.plan_id,
            model_name=self.model_name,
            shard_index=rec.shard_index,
            worker_id=rec.worker_id,
            browser=rec.browser,
            platform=rec.platform,
            failure=rec.failure,
            action=rec.action,
            success=ok,
            duration_ms=duration_ms,
            error=rec.error[:1000],
        )
        self.metrics.record_recovery(event)
        task = asyncio.get_running_loop().create_task(self._emit(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _emit(self, event: RecoveryEvent) -> None:
        try:
            await self.broker.emit(event)
        except Exception as e:  # an event lost to an outage must not break recovery
            log.warning("could not append recovery event for %s: %s", event.request_id, e)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
