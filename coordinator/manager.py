"""``ModelShardingManager``: the public API, as the guide shows it, on real browsers and Redis Streams.

Without ``redis_url`` (and no ``REDIS_URL`` in the environment) the manager starts an embedded
valkey-server and one local worker process per shard. With it, it uses the workers registered there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from broker.browsers import find_executable, install_hint
from broker.embedded import EmbeddedValkey
from broker.errors import BrokerError
from broker.ledger import Ledger
from broker.messages import Assignment, AssignmentReply, RequestEvent, ShardJob, ShardResult, StageTrace
from broker.messages import DeadLetter as DeadLetterMessage
from broker.registry import WorkerInfo
from broker.streams import Broker
from coordinator.errors import AllocationError, InputError, XshardError
from coordinator.history.store import HistoryError, HistoryStore, merge_history
from coordinator.history.writer import HistoryWriter
from coordinator.model.resolve import ResolvedModel, resolve_model
from coordinator.model.validation import validate_inputs
from coordinator.planning.allocation import Slot, allocate
from coordinator.planning.recommendations import BrowserStat, allocate_from_history, recommend
from coordinator.planning.shardset import ShardSet, build_shard_set
from coordinator.recovery import Policy
from coordinator.recovery.ladder import FAULT_TOLERANCE_LEVELS, RECOVERY_STRATEGIES
from coordinator.runtime.dispatch import Dispatcher
from coordinator.runtime.fleet import Fleet
from coordinator.runtime.launcher import LocalWorkers
from coordinator.runtime.metrics import LiveMetrics
from coordinator.runtime.monitor import Monitor
from coordinator.runtime.recoverer import Recoverer
from coordinator.runtime.requests import RequestTracker
from coordinator.settings import ManagerSettings

log = logging.getLogger(__name__)


Progress = Callable[[str], None]
CLOSE_STEP_TIMEOUT_S = 10.0


def now_ms() -> int:
    return int(time.time() * 1000)


def _match_browsers(slots: Mapping[int, Slot], live: list[WorkerInfo]) -> dict[int, str] | None:
    """Distinct live workers of each shard's browser, or None if some shard has none free."""
    free = list(live)
    out = {}
    for i, slot in slots.items():
        w = next((w for w in free if w.browser == slot.browser), None)
        if w is None:
            return None
        free.remove(w)
        out[i] = w.worker_id
    return out


class ModelShardingManager:
    """Shards a model across browsers and runs inference through the shards."""

    def __init__(
        self,
        model_name: str,
        num_shards: int = 2,
        shard_type: str = "layer",
        model_type: str = "text",
        enable_ipfs: bool = True,
        max_connections: int = 4,
        db_path: str | None = None,
        fault_tolerance_level: str = "medium",
        recovery_strategy: str = "progressive",
        custom_browser_allocation: Mapping[int, Mapping[str, Any]] | None = None,
        *,
        redis_url: str | None = None,
        browsers: Sequence[str] | None = None,
        platform: str = "auto",
        settings: ManagerSettings | None = None,
        progress: Progress | None = None,
    ) -> None:
        if fault_tolerance_level not in FAULT_TOLERANCE_LEVELS:
            raise ValueError(f"fault_tolerance_level must be one of {FAULT_TOLERANCE_LEVELS}")
        if recovery_strategy not in RECOVERY_STRATEGIES:
            raise ValueError(f"recovery_strategy must be one of {RECOVERY_STRATEGIES}")
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.model_name = model_name
        self.num_shards = num_shards
        self.shard_type = shard_type
        self.model_type = model_type
        self.enable_ipfs = enable_ipfs  # content addressing is by sha256; IPFS fetching is not implemented
        self.max_connections = max_connections
        self.db_path = db_path
        self.fault_tolerance_level = fault_tolerance_level
        self.recovery_strategy = recovery_strategy
        self.custom_browser_allocation = dict(custom_browser_allocation or {})
        self.redis_url = redis_url if redis_url is not None else os.environ.get("REDIS_URL") or None
        self.browsers = list(browsers) if browsers else None
        self.platform = platform
        self.settings = settings or ManagerSettings.from_env()
        self.coordinator_id = self.settings.coordinator_id or f"coord-{uuid.uuid4().hex[:10]}"
        self.policy = Policy.from_env(level=fault_tolerance_level, strategy=recovery_strategy)
        self.last_error: str | None = None
        self.initialized = False
        self.model: ResolvedModel | None = None
        self.shards: ShardSet | None = None
        self.allocation: dict[int, dict[str, Any]] = {}
        self.metrics = LiveMetrics(shard_type)
        self._progress = progress or (lambda msg: log.info("%s", msg))
        self._embedded: EmbeddedValkey | None = None
        self._broker: Broker | None = None
        self._dispatcher: Dispatcher | None = None
        self._local: LocalWorkers | None = None
        self._route: tuple[str, ...] = ()
        self._assigned: dict[str, list[str]] = {}  # worker_id -> stage streams
        self._slots: dict[int, Slot] = {}
        self._emitting: set[asyncio.Task[None]] = set()
        self._ledger: Ledger | None = None
        self._tracker: RequestTracker | None = None
        self._recoverer: Recoverer | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._monitor: Monitor | None = None
        self.fleet = Fleet(self.settings.heartbeat_max_age_ms)
        self._history = HistoryStore(db_path) if db_path else None
        self._history_writer: HistoryWriter | None = None
        self._history_stats: list[BrowserStat] = []
        self._prior_history: dict[str, Any] = {}

    @property
    def broker_url(self) -> str | None:
        """The broker in use (the embedded one's URL when no ``redis_url`` was given)."""
        return self._broker.url if self._broker else None

    @property
    def route(self) -> tuple[str, ...]:
        """Stage stream names of this manager's plan, in order."""
        return self._route

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> ModelShardingManager:
        if not await self.initialize_sharding():
            await self.close()
            raise XshardError(self.last_error or "initialize_sharding failed")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def prepare(self) -> ShardSet:
        """Resolve and cut the model and choose browsers, without a broker or a browser.

        Idempotent; ``initialize_sharding`` calls it. Raises ModelError, PlanError, AllocationError.
        """
        if self.shards is not None:
            return self.shards
        s = self.settings
        self._progress(f"resolving model {self.model_name}")
        self.model = await asyncio.to_thread(resolve_model, self.model_name, s.cache_dir, self._progress)
        self._progress(f"cutting {self.model_name} into {self.num_shards} {self.shard_type} shards")
        shards = await asyncio.to_thread(
            build_shard_set,
            self.model.onnx_path,
            self.num_shards,
            self.shard_type,
            s.cache_dir,
            s.weight_share,
        )
        self._slots = allocate(
            self.num_shards,
            model_type=self.model_type,
            model_kind=self.model.kind,
            installed=lambda b: find_executable(b) is not None,
            platform=self.platform,
            browsers=self.browsers,
            custom=self.custom_browser_allocation,
        )
        if self._history is not None:
            await self._read_history(shards.plan.plan_id)
        self.shards = shards
        return shards

    async def _read_history(self, plan_id: str) -> None:
        """Measured history of this model steers the allocation (unless the user fixed it)."""
        assert self._history is not None
        try:
            stats = await asyncio.to_thread(self._history.browser_stats, self.model_name, self.shard_type)
            stats += await asyncio.to_thread(
                self._history.browser_stats, self.model_name, self.shard_type, by_shard=True, plan_id=plan_id
            )
            self._prior_history = await asyncio.to_thread(self._history.model_history, self.model_name, plan_id)
        except HistoryError as e:
            log.warning("history in %s unreadable, allocating from the guide table: %s", self.db_path, e)
            return
        self._history_stats = stats
        if not self.browsers and stats:
            installed = (lambda b: find_executable(b) is not None) if self.redis_url is None else (lambda b: True)
            self._slots = allocate_from_history(
                self._slots,
                stats,
                platform=self.platform,
                fixed=set(self.custom_browser_allocation),
                installed=installed,
            )

    def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The inputs as the model's arrays, or InputError; needs ``prepare()`` first."""
        if self.shards is None:
            raise XshardError("call prepare() or initialize_sharding() first")
        return validate_inputs(inputs, self.shards.profile.inputs, self.shards.profile.vocab_limits)

    async def initialize_sharding(self) -> bool:
        """Prepare the model, connect the broker, start or find workers, load the shards."""
        try:
            await self.prepare()
            await self._start()
        except (XshardError, BrokerError, ValueError, OSError) as e:
            self.last_error = str(e)
            log.info("initialize_sharding failed: %s", e)
            return False
        self.initialized = True
        return True

    async def _start(self) -> None:
        assert self.shards is not None
        await self._connect()
        assert self._broker is not None
        plan = self.shards.plan
        self._route = tuple(self._broker.keys.stage(plan.plan_id, st.index) for st in plan.stages)
        slots = dict(self._slots)
        workers = await (self._start_local_workers(slots) if self.redis_url is None else self._find_workers(slots))
        await self._assign(slots, workers)
        self.fleet.update(await self._broker.live_workers(now_ms(), self.settings.heartbeat_max_age_ms))
        assert self._recoverer is not None
        s = self.settings
        self._monitor = Monitor(
            self._broker,
            self.fleet,
            self._recoverer,
            self._route,
            self._assign_stage,
            s.monitor_interval_s,
            s.sweep_interval_s,
            s.min_idle_ms,
        )
        self._monitor_task = asyncio.get_running_loop().create_task(self._monitor.run())

    async def _connect(self) -> None:
        s = self.settings
        if self.redis_url is None:
            self._progress("starting the embedded valkey broker")
            self._embedded = await EmbeddedValkey().__aenter__()
            url = self._embedded.url
        else:
            url = self.redis_url
        self._broker = Broker(url, s.namespace)
        await self._broker.ping()
        assert self.shards is not None
        self._ledger = Ledger(self._broker)
        self._tracker = RequestTracker(self._ledger, self.coordinator_id)
        self._recoverer = Recoverer(
            broker=self._broker,
            ledger=self._ledger,
            fleet=self.fleet,
            policy=self.policy,
            tracker=self._tracker,
            metrics=self.metrics,
            assign=self._assign_stage,
            coordinator_id=self.coordinator_id,
            model_name=self.model_name,
            plan_id=self.shards.plan.plan_id,
        )
        self._dispatcher = Dispatcher(self._broker, self.coordinator_id, self._on_result, self._recoverer.on_failure)
        await self._dispatcher.start()
        if self.db_path:
            self._history_writer = HistoryWriter(self._broker, self.db_path, on_commit=self._on_history_commit)
            await self._history_writer.start()

    async def _start_local_workers(self, slots: dict[int, Slot]) -> dict[int, list[str]]:
        assert self._broker is not None
        for slot in slots.values():
            if find_executable(slot.browser) is None:
                raise AllocationError(install_hint(slot.browser))
        s = self.settings
        self._local = LocalWorkers(self._broker.url, s.namespace, s.cache_dir, s.heartbeat_s)
        chosen = {i: self._local.spawn(slot.browser, slot.platform).worker_id for i, slot in slots.items()}
        names = ", ".join(f"{slot.browser}" for slot in slots.values())
        self._progress(f"launching {len(chosen)} headless browsers ({names})")
        await self._local.wait_registered(self._broker, list(chosen.values()), s.worker_wait_s, s.heartbeat_max_age_ms)
        return {i: [wid] for i, wid in chosen.items()}

    async def _find_workers(self, slots: dict[int, Slot]) -> dict[int, list[str]]:
        """Map shards to registered workers: a matching browser first; extra workers scale out.

        Waits until every shard has a free worker of its browser, or (once there are enough workers
        of any browser) ``browser_match_wait_s`` more, then takes other browsers and says so.
        """
        assert self._broker is not None
        s = self.settings
        deadline = time.monotonic() + s.worker_wait_s
        enough_since: float | None = None
        self._progress(f"waiting for {self.num_shards} workers on {self.redis_url}")
        while True:
            live = await self._broker.live_workers(now_ms(), s.heartbeat_max_age_ms)
            matched = _match_browsers(slots, live)
            if len(live) >= self.num_shards:
                enough_since = enough_since or time.monotonic()
                if matched is not None or time.monotonic() - enough_since > s.browser_match_wait_s:
                    break
            if time.monotonic() > deadline:
                have = ", ".join(f"{w.worker_id} ({w.browser})" for w in live) or "none"
                raise AllocationError(
                    f"{self.num_shards} shards need {self.num_shards} workers; {len(live)} registered on "
                    f"{self.redis_url} (namespace {s.namespace}) within {s.worker_wait_s}s: {have}"
                )
            await asyncio.sleep(0.2)
        free = list(live)
        chosen: dict[int, list[str]] = {}
        for i, slot in slots.items():
            match = next((w for w in free if w.browser == slot.browser), None)
            if match is None:
                match = free[0]
                why = f"{slot.reason}; no free {slot.browser} worker registered, used {match.browser}"
                slots[i] = Slot(match.browser, slot.platform, slot.specialization, why)
            free.remove(match)
            chosen[i] = [match.worker_id]
        for k, extra in enumerate(free):
            chosen[k % self.num_shards].append(extra.worker_id)
        return chosen

    async def _assign(self, slots: dict[int, Slot], workers: dict[int, list[str]]) -> None:
        assert self._broker and self._dispatcher and self.shards
        plan, s = self.shards.plan, self.settings
        futures: dict[tuple[int, str], asyncio.Future[AssignmentReply]] = {}
        for st in plan.stages:
            for wid in workers[st.index]:
                a = Assignment(
                    assignment_id=uuid.uuid4().hex,
                    plan_id=plan.plan_id,
                    shard_index=st.index,
                    stage_stream=self._route[st.index],
                    onnx_sha256=self.shards.shard_sha256[st.index],
                    input_names=st.input_names,
                    carry_names=st.carry_names,
                    platform=slots[st.index].platform,
                    reply_stream=self._dispatcher.reply_stream,
                    model_name=self.model_name,
                    shard_type=self.shard_type,
                )
                futures[(st.index, wid)] = await self._dispatcher.assign(wid, a)
                self._assigned.setdefault(wid, []).append(a.stage_stream)
                self.fleet.add(st.index, wid)
        self._progress(f"loading {len(futures)} shard sessions in the browsers")
        try:
            async with asyncio.timeout(s.assign_timeout_s):
                replies = {k: await f for k, f in futures.items()}
        except TimeoutError as e:
            raise AllocationError(f"workers did not load their shards within {s.assign_timeout_s}s") from e
        failed = [f"shard {i} on {wid}: {r.error}" for (i, wid), r in replies.items() if not r.ok]
        if failed:
            raise AllocationError("loading shards failed: " + "; ".join(failed))
        for (i, wid), r in sorted(replies.items()):
            slot = slots[i]
            entry = {
                **slot.as_dict(),
                "worker_id": wid,
                "execution_provider": r.execution_provider,
                "adapter": r.adapter,
                "user_agent": r.user_agent,
                "load_ms": round(r.load_ms, 1),
                "requested_platform": slot.platform,
                "platform": r.execution_provider,
                "platform_note": r.note,
            }
            if i in self.allocation:
                self.allocation[i].setdefault("replicas", []).append(entry)
            else:
                self.allocation[i] = entry

    async def _assign_stage(self, index: int, worker_id: str) -> bool:
        """Redistribute: load stage ``index``'s shard onto ``worker_id`` and make it consume the stage."""
        assert self._dispatcher is not None and self.shards is not None
        if worker_id in self.fleet.serving.get(index, []):
            return True
        st = self.shards.plan.stages[index]
        slot = self._slots.get(index)
        a = Assignment(
            assignment_id=uuid.uuid4().hex,
            plan_id=self.shards.plan.plan_id,
            shard_index=index,
            stage_stream=self._route[index],
            onnx_sha256=self.shards.shard_sha256[index],
            input_names=st.input_names,
            carry_names=st.carry_names,
            platform=slot.platform if slot else "auto",
            reply_stream=self._dispatcher.reply_stream,
            model_name=self.model_name,
            shard_type=self.shard_type,
        )
        fut = await self._dispatcher.assign(worker_id, a)
        try:
            reply = await asyncio.wait_for(fut, self.settings.assign_reply_timeout_s)
        except TimeoutError:
            log.warning(
                "redistributing shard %d onto %s: no reply within %ss",
                index,
                worker_id,
                self.settings.assign_reply_timeout_s,
            )
            return False
        if not reply.ok:
            log.warning("redistributing shard %d onto %s failed: %s", index, worker_id, reply.error)
            return False
        self.fleet.add(index, worker_id)
        self._assigned.setdefault(worker_id, []).append(a.stage_stream)
        entry = {
            "browser": self.fleet.browser(worker_id),
            "worker_id": worker_id,
            "platform": reply.execution_provider,
            "execution_provider": reply.execution_provider,
            "adapter": reply.adapter,
            "reason": "redistributed by recovery",
            "load_ms": round(reply.load_ms, 1),
        }
        self.allocation.setdefault(index, entry).setdefault("replicas", []).append(entry)
        return True

    async def _bounded(self, what: str, aw: Any, timeout_s: float = CLOSE_STEP_TIMEOUT_S) -> None:
        try:
            await asyncio.wait_for(aw, timeout_s)
        except TimeoutError:
            log.warning("close: %s did not finish within %ss", what, timeout_s)

    async def close(self) -> None:
        """Release shard sessions, stop local workers and the embedded broker."""
        if self._monitor_task is not None:
            if self._monitor is not None:
                self._monitor.stop()
            self._monitor_task.cancel()
            await self._bounded("the monitor", asyncio.gather(self._monitor_task, return_exceptions=True))
            self._monitor_task = None
        await self._bounded("pending event appends", asyncio.gather(*self._emitting, return_exceptions=True))
        if self._recoverer is not None:
            await self._bounded("recovery event appends", self._recoverer.drain())
        if self._tracker is not None:
            self._tracker.cancel_all()
        if self._history_writer is not None:
            try:
                await self._history_writer.close()  # flushes what is in the events stream
            except (BrokerError, HistoryError) as e:
                log.warning("history writer: %s", e)
            self._history_writer = None
        if self._dispatcher is not None:
            await self._bounded("the reply reader", self._dispatcher.close())
        if self._local is not None:
            await self._local.stop_all()
        elif self._broker is not None and self._assigned:
            from broker.messages import Release

            for wid, streams in self._assigned.items():
                for stream in streams:
                    try:
                        await self._broker.add(self._broker.keys.control(wid), Release(stream))
                    except BrokerError as e:
                        log.warning("could not release %s on %s: %s", stream, wid, e)
        if self._broker is not None:
            try:
                if self._ledger is not None and not await self._ledger.inflight(self.coordinator_id):
                    await self._broker.delete(self._broker.keys.reply(self.coordinator_id))
            except BrokerError:
                pass
            await self._broker.close()
        if self._embedded is not None:
            await self._embedded.__aexit__(None, None, None)
        self._broker = self._dispatcher = self._local = self._embedded = None
        self.initialized = False

    # -- inference ---------------------------------------------------------------------------

    async def run_inference_sharded(self, inputs: Mapping[str, Any], max_retries: int = 2) -> dict[str, Any]:
        """Run one request through the shards; ``{"result", "metrics"}`` or ``{"error", "error_kind"}``.

        ``max_retries`` bounds the tries of each stage beyond the first; the recovery policy
        (``fault_tolerance_level``, ``recovery_strategy``) decides how each retry is made.
        """
        if not self.initialized or self.shards is None or self._tracker is None or self._dispatcher is None:
            return {"error": "the manager is not initialized: call initialize_sharding() first", "error_kind": "state"}
        try:
            arrays = self.check_inputs(inputs)
        except InputError as e:
            return {"error": str(e), "error_kind": "input"}
        request_id = uuid.uuid4().hex
        job = ShardJob(
            request_id=request_id,
            plan_id=self.shards.plan.plan_id,
            stage_index=0,
            route=self._route,
            reply_stream=self._dispatcher.reply_stream,
            tensors=arrays,
            enqueued_ms=time.time() * 1000.0,
        )
        if self._recoverer is not None:
            self._recoverer.max_attempts[request_id] = max(0, max_retries) + 1
        started = time.perf_counter()
        try:
            fut = await self._tracker.submit(job)
        except BrokerError as e:
            return {"error": f"request not accepted: {e}", "error_kind": "unavailable", "request_id": request_id}
        return await self._outcome(request_id, fut, started)

    async def _outcome(self, request_id: str, fut: asyncio.Future[Any], started: float) -> dict[str, Any]:
        assert self._tracker is not None
        try:
            outcome = await asyncio.wait_for(asyncio.shield(fut), self.settings.request_timeout_s)
        except TimeoutError:
            self._tracker.forget(request_id)
            outcome = await self._bury_timed_out(request_id)
        if isinstance(outcome, ShardResult):
            return self._success(request_id, outcome, started, max((t.attempt for t in outcome.trace), default=1))
        latency_ms = (time.perf_counter() - started) * 1000.0
        error = f"dead-lettered at shard {outcome.stage_index}: {outcome.reason}"
        self.metrics.record_request(request_id, False, latency_ms, error)
        self._emit_request(request_id, latency_ms, 0.0, outcome.attempts, "dead_letter", error)
        return {
            "error": error,
            "error_kind": "dead_letter",
            "request_id": request_id,
            "attempts": outcome.attempts,
            "workers_tried": list(outcome.workers_tried),
        }

    async def _bury_timed_out(self, request_id: str) -> DeadLetterMessage:
        assert self._ledger is not None and self.shards is not None
        state = await self._ledger.state(request_id)
        job = state.job if state else None
        reason = f"timed out after {self.settings.request_timeout_s}s"
        dead = DeadLetterMessage(
            request_id=request_id,
            plan_id=self.shards.plan.plan_id,
            stage_index=0,
            route=self._route,
            reply_stream=self._dispatcher.reply_stream if self._dispatcher else "",
            tensors=job.tensors if job else {},
            reason=reason,
            error=reason,
            attempts=1,
            workers_tried=(),
            ts_ms=time.time() * 1000.0,
        )
        await self._ledger.bury(dead, self.coordinator_id)
        if self._recoverer is not None:
            self._recoverer.finished(request_id, ok=False)
        return dead

    async def _on_result(self, msg: ShardResult, entry: tuple[str, str]) -> None:
        assert self._tracker is not None
        for t in msg.trace:
            self.fleet.record(t.worker_id, t.execution_provider, ok=True)
        await self._tracker.on_result(msg, entry)
        if self._recoverer is not None:
            self._recoverer.finished(msg.request_id, ok=True)

    async def resume(self) -> list[str]:
        """Requests this coordinator id accepted before a restart and has not finished; ``wait_for`` each."""
        if self._tracker is None:
            raise XshardError("the manager is not initialized: call initialize_sharding() first")
        return await self._tracker.resume()

    async def wait_for(self, request_id: str) -> dict[str, Any]:
        """The outcome of a request accepted earlier (e.g. before a coordinator restart)."""
        assert self._tracker is not None and self._ledger is not None
        fut = self._tracker.watch(request_id)  # before reading the state: a result may land in between
        state = await self._ledger.state(request_id)
        if state is not None and isinstance(state.result, ShardResult):
            self._tracker.forget(request_id)
            return self._success(request_id, state.result, time.perf_counter(), 1)
        if state is None or state.status == "dead":
            self._tracker.forget(request_id)
            why = "is in the dead letter" if state else "is unknown"
            kind = "dead_letter" if state else "state"
            return {"error": f"request {request_id} {why}", "error_kind": kind, "request_id": request_id}
        return await self._outcome(request_id, fut, time.perf_counter())

    async def dead_letters(self) -> list[tuple[str, DeadLetterMessage | None, str]]:
        assert self._ledger is not None
        return await self._ledger.dead_letters()

    async def replay(self, entry_ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Re-enqueue dead-lettered jobs of this plan (all, or those ids) and wait for their outcomes."""
        assert self._ledger is not None and self._tracker is not None and self._dispatcher is not None
        wanted = set(entry_ids) if entry_ids else None
        waits = {}
        for entry_id, dead, _ in await self._ledger.dead_letters():
            if dead is None or (wanted is not None and entry_id not in wanted) or dead.route[:1] != self._route[:1]:
                continue
            job = ShardJob(
                request_id=dead.request_id,
                plan_id=dead.plan_id,
                stage_index=dead.stage_index,
                route=dead.route,
                reply_stream=self._dispatcher.reply_stream,
                tensors=dead.tensors,
                enqueued_ms=time.time() * 1000.0,
                trace=dead.trace,
            )
            fut = self._tracker.watch(dead.request_id)
            await self._ledger.exhume(entry_id, job, self.coordinator_id)
            waits[entry_id] = (dead.request_id, fut)
        out = {}
        for entry_id, (request_id, fut) in waits.items():
            out[entry_id] = await self._outcome(request_id, fut, time.perf_counter())
        return out

    def _emit_request(
        self, request_id: str, latency_ms: float, kernel_ms: float, attempts: int, outcome: str, error: str
    ) -> None:
        """Append the request's event to the events stream without delaying the caller."""
        if self._broker is None or self.shards is None:
            return
        event = RequestEvent(
            event_id=uuid.uuid4().hex,
            ts_ms=time.time() * 1000.0,
            request_id=request_id,
            plan_id=self.shards.plan.plan_id,
            model_name=self.model_name,
            shard_type=self.shard_type,
            num_shards=self.num_shards,
            coordinator_id=self.coordinator_id,
            latency_ms=latency_ms,
            kernel_ms=kernel_ms,
            attempts=attempts,
            outcome=outcome,
            error=error,
        )
        task = asyncio.get_running_loop().create_task(self._emit(event))
        self._emitting.add(task)
        task.add_done_callback(self._emitting.discard)

    async def _emit(self, event: RequestEvent) -> None:
        assert self._broker is not None
        try:
            await self._broker.emit(event)
        except BrokerError as e:
            log.warning("request %s: could not append its event: %s", event.request_id, e)

    def _component_id(self, shard_index: int) -> str:
        return f"shard_{shard_index}"

    def _record_traces(self, trace: Sequence[StageTrace]) -> None:
        for t in trace:
            info = {
                "browser": t.browser,
                "platform": t.execution_provider,
                "shard_type": self.shard_type,
                "shard_index": t.shard_index,
                "worker_id": t.worker_id,
            }
            self.metrics.record_component(self._component_id(t.shard_index), info, True, t.kernel_ms)

    def _success(self, request_id: str, reply: ShardResult, started: float, attempts: int) -> dict[str, Any]:
        latency_ms = (time.perf_counter() - started) * 1000.0
        self._record_traces(reply.trace)
        self.metrics.record_request(request_id, True, latency_ms)
        components = {}
        for t in reply.trace:
            components[self._component_id(t.shard_index)] = {
                "status": "success",
                "shard_index": t.shard_index,
                "worker_id": t.worker_id,
                "browser": t.browser,
                "user_agent": t.user_agent,
                "execution_provider": t.execution_provider,
                "adapter": t.adapter,
                "kernel_ms": round(t.kernel_ms, 3),
                "queue_ms": round(t.queue_ms, 3),
                "worker_ms": round(t.worker_ms, 3),
                "bytes_in": t.bytes_in,
                "bytes_out": t.bytes_out,
                "attempt": t.attempt,
            }
        kernel_ms = sum(t.kernel_ms for t in reply.trace)
        self._emit_request(request_id, latency_ms, kernel_ms, attempts, "success", "")
        return {
            "result": {name: np.array(arr) for name, arr in reply.tensors.items()},
            "metrics": {
                "request_id": request_id,
                "inference_time_ms": round(latency_ms, 3),
                "kernel_time_ms": round(kernel_ms, 3),
                "overhead_ms": round(latency_ms - kernel_ms, 3),
                "component_count": self.num_shards,
                "successful_components": len(components),
                "component_results": components,
                "attempts": attempts,
            },
        }

    # -- reporting ---------------------------------------------------------------------------

    def get_metrics(self) -> dict[str, Any]:
        plan = self.shards.plan if self.shards else None
        return {
            "model_name": self.model_name,
            "model_path": str(self.model.onnx_path) if self.model else None,
            "model_kind": self.model.kind if self.model else None,
            "num_shards": self.num_shards,
            "shard_type": self.shard_type,
            "model_type": self.model_type,
            "initialized": self.initialized,
            "fault_tolerance_level": self.fault_tolerance_level,
            "recovery_strategy": self.recovery_strategy,
            "broker": self._broker.url if self._broker else self.redis_url,
            "embedded_broker": self._embedded is not None,
            "plan_id": plan.plan_id if plan else None,
            "boundary_kind": plan.boundary_kind if plan else None,
            "shards": [
                {
                    "index": st.index,
                    "nodes": [st.start, st.end],
                    "inputs": list(st.input_names),
                    "carries": list(st.carry_names),
                    "weight_bytes": st.weight_bytes,
                    "cost_share": round(st.cost_share, 4),
                    "flops_share": round(st.flops_share, 4),
                    "sha256": self.shards.shard_sha256[st.index] if self.shards else None,
                }
                for st in (plan.stages if plan else ())
            ],
            "browser_allocation": {i: dict(v) for i, v in sorted(self.allocation.items())},
            "recommendations": recommend(self._history_stats, self.allocation, self.model_type),
            "circuit_breakers": self.fleet.breakers.snapshot(time.monotonic()),
            "requests": self.metrics.requests.as_dict(),
        }

    def get_performance_history(self) -> dict[str, Any]:
        """The guide's structure: live counters of this manager, merged with what the database
        already held for this model and plan when ``db_path`` was given."""
        live = self.metrics.history()
        return merge_history(self._prior_history, live) if self._history is not None else live

    def _on_history_commit(self, *_: object) -> None:
        if self._history is None:
            return
        task = asyncio.get_running_loop().create_task(self._refresh_stats())
        self._emitting.add(task)
        task.add_done_callback(self._emitting.discard)

    async def _refresh_stats(self) -> None:
        assert self._history is not None
        try:
            self._history_stats = await asyncio.to_thread(self._history.browser_stats, self.model_name, self.shard_type)
        except HistoryError as e:
            log.info("history stats not refreshed: %s", e)
