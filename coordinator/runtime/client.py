"""The request client: one request through the plan's stages, from submission to its outcome.

It accepts the request (``RequestTracker.submit``: one MULTI in the ledger), waits for the result or the
dead letter, buries a request that outlives ``timeout_s``, resumes requests a restarted coordinator with
the same id accepted, replays dead letters, and turns each outcome into the guide's shape
(``coordinator.runtime.results``) while it counts it in the live metrics and appends its event.
It works through a started ``Deployment``; other clients (generation sessions) can sit beside it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker.errors import BrokerError
from broker.ledger import RequestState
from broker.messages import DagRequest, DeadLetter, RequestEvent, StageHop, StageResult
from coordinator.planning.shardset import ShardSet
from coordinator.runtime import results
from coordinator.runtime.dag import run_dag
from coordinator.runtime.deployment import Deployment
from coordinator.runtime.metrics import LiveMetrics

log = logging.getLogger(__name__)

RESUMED_RETRIES = 2  # a resumed DAG request's segments: the default max_retries of run_inference_sharded


@dataclass(frozen=True, slots=True)
class RequestLabels:
    """How this coordinator's requests are named in their events and metrics."""

    model_name: str
    shard_type: str
    num_shards: int
    coordinator_id: str


class RequestClient:
    """Requests through a started deployment; each call returns the guide's result or error dict."""

    def __init__(
        self,
        deployment: Deployment,
        metrics: LiveMetrics,
        labels: RequestLabels,
        timeout_s: float,
        shards: ShardSet | None = None,
    ) -> None:
        self._rt = deployment.runtime
        self._dag = shards if shards is not None and not shards.plan.is_chain else None
        self.dag_parallel = True  # a DAG's independent segments at once; False: one after another (benchmarks)
        self._resumed_dags: dict[str, asyncio.Future[StageResult | DeadLetter]] = {}  # by resume(), by request id
        self._spawn = deployment.spawn
        self.metrics = metrics
        self.labels = labels
        self.timeout_s = timeout_s

    async def run(self, arrays: dict[str, np.ndarray], max_retries: int) -> dict[str, Any]:
        """Submit checked inputs as a new request and wait for its outcome."""
        if self._dag is not None:
            return await self._run_dag(self._dag, arrays, max_retries)
        rt = self._rt
        request_id = uuid.uuid4().hex
        job = StageHop(
            request_id=request_id,
            plan_id=rt.plan_id,
            stage_index=0,
            route=rt.route,
            reply_stream=rt.dispatcher.reply_stream,
            tensors=arrays,
            enqueued_ms=time.time() * 1000.0,
        )
        rt.recoverer.max_attempts[request_id] = max(0, max_retries) + 1
        started = time.perf_counter()
        try:
            fut = await rt.tracker.submit(job)
        except BrokerError as e:
            return results.failure(f"request not accepted: {e}", "unavailable", request_id)
        return await self._outcome(request_id, fut, started)

    async def _run_dag(self, shards: ShardSet, arrays: dict[str, np.ndarray], max_retries: int) -> dict[str, Any]:
        """A DAG plan's request: its inputs kept in the ledger (``accept_dag``), each segment a sub-request
        (:mod:`coordinator.runtime.dag`)."""
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        request = DagRequest(request_id, self._rt.plan_id, arrays, time.time() * 1000.0)
        try:
            await self._rt.ledger.accept_dag(request, self.labels.coordinator_id)
            outcome = await self._drive_dag(shards, request, max_retries, resumed=False)
        except BrokerError as e:
            return results.failure(f"request not accepted: {e}", "unavailable", request_id)
        return self._finish(request_id, outcome, started)

    async def _drive_dag(
        self, shards: ShardSet, request: DagRequest, max_retries: int, resumed: bool
    ) -> StageResult | DeadLetter:
        """Run the DAG's segments and record the request's outcome; ``resumed``: a segment the ledger knows
        (done, dead or in flight, from before a restart) is taken from there, not submitted again."""
        rt = self._rt

        async def submit(
            sub_id: str, tensors: dict[str, np.ndarray], first: int, route: tuple[str, ...]
        ) -> StageResult | DeadLetter:
            rt.recoverer.max_attempts[sub_id] = max(0, max_retries) + 1
            if resumed and (known := await self._known(sub_id)) is not None:
                return known
            job = StageHop(
                request_id=sub_id,
                plan_id=rt.plan_id,
                stage_index=first,
                route=route,
                reply_stream=rt.dispatcher.reply_stream,
                tensors=tensors,
                enqueued_ms=time.time() * 1000.0,
            )
            return await self._wait(sub_id, await rt.tracker.submit(job))

        outputs = [o.name for o in shards.profile.outputs]
        rid = request.request_id
        outcome = await run_dag(shards.plan, rt.route, rid, request.tensors, outputs, submit, self.dag_parallel)
        status = "done" if isinstance(outcome, StageResult) else "dead"
        await rt.ledger.finish(rid, self.labels.coordinator_id, status, outcome)
        return outcome

    async def _known(self, sub_id: str) -> StageResult | DeadLetter | None:
        """A sub-request's outcome as the ledger has it (waiting for it while in flight); None if unknown."""
        rt = self._rt
        fut = rt.tracker.watch(sub_id)  # before reading the state: a result may land in between
        state = await rt.ledger.state(sub_id)
        if state is None or isinstance(state.result, StageResult) or state.status == "dead":
            rt.tracker.forget(sub_id)
        if state is None:
            return None
        if isinstance(state.result, StageResult):
            return state.result
        if state.status == "dead":
            return self._dead_before(sub_id, state.reason or "dead-lettered before the coordinator restarted")
        return await self._wait(sub_id, fut)

    def _dead_before(self, request_id: str, reason: str) -> DeadLetter:
        return self._hop_of(request_id, None).buried(reason, reason, (), time.time() * 1000.0)

    def _hop_of(self, request_id: str, job: StageHop | None) -> StageHop:
        """The request's hop as its state holds it, or its first stage's with no inputs."""
        rt = self._rt
        return job or StageHop(request_id, rt.plan_id, 0, rt.route, rt.dispatcher.reply_stream, {}, 0.0)

    async def resume(self) -> list[str]:
        """Requests this coordinator id accepted before a restart and has not finished; ``wait_for`` each.

        A DAG plan's request is driven on at once (its sub-requests, not listed, are taken from the ledger
        where they finished or are in flight, and submitted where they never were)."""
        ids = await self._rt.tracker.resume()
        shards = self._dag
        if shards is None:
            return ids
        parents = {}
        for rid in ids:
            state = await self._rt.ledger.state(rid)
            if state is not None and state.dag is not None:
                parents[rid] = state.dag
        for rid, request in parents.items():
            self._rt.tracker.forget(rid)
            if rid not in self._resumed_dags:
                task = asyncio.ensure_future(self._drive_dag(shards, request, RESUMED_RETRIES, resumed=True))
                self._resumed_dags[rid] = task
        return [r for r in ids if not any(r.startswith(f"{p}-s") for p in parents)]

    async def wait_for(self, request_id: str) -> dict[str, Any]:
        """The outcome of a request accepted earlier (e.g. before a coordinator restart)."""
        tracker, ledger = self._rt.tracker, self._rt.ledger
        if (task := self._resumed_dags.get(request_id)) is not None:
            outcome = await task
            self._resumed_dags.pop(request_id, None)
            return self._finish(request_id, outcome, time.perf_counter())
        fut = tracker.watch(request_id)  # before reading the state: a result may land in between
        state = await ledger.state(request_id)
        if state is not None and isinstance(state.result, StageResult):
            tracker.forget(request_id)
            return self._success(request_id, state.result, time.perf_counter(), 1)
        if state is None or state.status == "dead":
            tracker.forget(request_id)
            why = "is in the dead letter" if state else "is unknown"
            return results.failure(f"request {request_id} {why}", "dead_letter" if state else "state", request_id)
        return await self._outcome(request_id, fut, time.perf_counter())

    async def dead_letters(self) -> list[tuple[str, DeadLetter | None, str]]:
        return await self._rt.ledger.dead_letters()

    async def replay(self, entry_ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Re-enqueue dead-lettered jobs of this plan (all, or those ids) and wait for their outcomes."""
        rt = self._rt
        wanted = set(entry_ids) if entry_ids else None
        waits = await rt.tracker.replay(rt.dispatcher.reply_stream, wanted, rt.route[0] if rt.route else None)
        return {entry_id: await self._outcome(rid, fut, time.perf_counter()) for entry_id, (rid, fut) in waits.items()}

    # -- outcomes --------------------------------------------------------------------------------

    async def _outcome(self, request_id: str, fut: asyncio.Future[Any], started: float) -> dict[str, Any]:
        return self._finish(request_id, await self._wait(request_id, fut), started)

    async def _wait(self, request_id: str, fut: asyncio.Future[Any]) -> StageResult | DeadLetter:
        """The result or dead letter; a request past ``timeout_s`` is buried."""
        try:
            outcome: StageResult | DeadLetter = await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            self._rt.tracker.forget(request_id)
            state = await self._rt.ledger.state(request_id)
            if state is not None and isinstance(state.result, StageResult):
                # finished in the ledger, but the result never reached this caller: never bury a result
                log.warning("request %s: result recorded but not delivered here; taken from the ledger", request_id)
                return state.result
            outcome = await self._bury_timed_out(request_id, state)
        return outcome

    def _finish(self, request_id: str, outcome: StageResult | DeadLetter, started: float) -> dict[str, Any]:
        if isinstance(outcome, StageResult):
            return self._success(request_id, outcome, started, max((t.attempt for t in outcome.trace), default=1))
        latency_ms = (time.perf_counter() - started) * 1000.0
        error = results.dead_letter_error(outcome)
        self.metrics.record_request(request_id, False, latency_ms, error)
        self._emit(request_id, latency_ms, 0.0, outcome.attempts, "dead_letter", error)
        return results.dead_lettered(request_id, outcome)

    async def _bury_timed_out(self, request_id: str, state: RequestState | None) -> DeadLetter:
        rt = self._rt
        job = state.job if state else None
        reason = f"timed out after {self.timeout_s}s"
        dead = self._hop_of(request_id, job).buried(reason, reason, (), time.time() * 1000.0)
        await rt.ledger.bury(dead, self.labels.coordinator_id)
        rt.recoverer.finished(request_id, ok=False)
        return dead

    def _success(self, request_id: str, reply: StageResult, started: float, attempts: int) -> dict[str, Any]:
        latency_ms = (time.perf_counter() - started) * 1000.0
        for t in reply.trace:
            info = results.component_info(t, self.labels.shard_type)
            self.metrics.record_component(results.component_id(t.shard_index), info, True, t.kernel_ms)
        self.metrics.record_request(request_id, True, latency_ms)
        self._emit(request_id, latency_ms, results.kernel_ms(reply.trace), attempts, "success", "")
        return results.success(request_id, reply, latency_ms, attempts, self.labels.num_shards)

    def _emit(
        self, request_id: str, latency_ms: float, kernel_ms: float, attempts: int, outcome: str, error: str
    ) -> None:
        """Append the request's event to the events stream without delaying the caller."""
        labels = self.labels
        event = RequestEvent(
            event_id=uuid.uuid4().hex,
            ts_ms=time.time() * 1000.0,
            request_id=request_id,
            plan_id=self._rt.plan_id,
            model_name=labels.model_name,
            shard_type=labels.shard_type,
            num_shards=labels.num_shards,
            coordinator_id=labels.coordinator_id,
            latency_ms=latency_ms,
            kernel_ms=kernel_ms,
            attempts=attempts,
            outcome=outcome,
            error=error,
        )
        self._spawn(self._append(event))

    async def _append(self, event: RequestEvent) -> None:
        try:
            await self._rt.broker.emit(event)
        except BrokerError as e:
            log.warning("request %s: could not append its event: %s", event.request_id, e)
