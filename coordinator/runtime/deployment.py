"""A deployment: one plan running on a broker and its workers, started in order and closed in one path.

It owns the broker connection (an embedded valkey-server when no ``redis_url`` is given, with one local
worker process per shard, or per run of consecutive shards under ``max_browsers``), the worker fleet,
the placement of stages on workers, and the lifecycles of the reply reader (dispatcher), the recoverer,
the liveness monitor and the history writer. Clients (the request client today; generation sessions
later) work through ``runtime`` and ``spawn``; the deployment knows nothing of what they send.

Everything started is entered on one ``AsyncExitStack`` as it starts, so ``close`` undoes exactly what
started, in reverse: the monitor, background appends, recovery events, waiting callers, the history
writer, the reply reader, the workers (local ones stopped, external ones released), the reply stream,
the broker connection, the embedded broker. Steps that wait for tasks are bounded by ``CLOSE_STEP_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.address import redact
from broker.artifact_server import Holding, serving_address
from broker.browsers import find_executable, install_hint
from broker.clock import now_ms
from broker.embedded import EmbeddedValkey
from broker.errors import BrokerError
from broker.ledger import Ledger
from broker.messages import Release, StageResult
from broker.registry import WorkerInfo
from broker.retry import poll
from broker.streams import Broker
from coordinator.errors import AllocationError, XshardError
from coordinator.history.store import HistoryError
from coordinator.history.writer import HistoryWriter
from coordinator.planning.allocation import Slot
from coordinator.planning.hosting import host_groups, wasm_threads
from coordinator.planning.shardset import ShardSet
from coordinator.recovery import Policy
from coordinator.runtime.dispatch import Dispatcher, Entry
from coordinator.runtime.fleet import Fleet
from coordinator.runtime.launcher import LocalWorkers
from coordinator.runtime.liveness import Liveness
from coordinator.runtime.metrics import LiveMetrics
from coordinator.runtime.monitor import Monitor
from coordinator.runtime.placement import Match, Placement, Target, match_browsers
from coordinator.runtime.recoverer import Recoverer
from coordinator.runtime.requests import RequestTracker
from coordinator.settings import ManagerSettings

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
CLOSE_STEP_TIMEOUT_S = 10.0
WORKER_POLL_S = 0.2  # how often the registry is read while waiting for external workers


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """Where, as whom and for which model a plan is deployed."""

    settings: ManagerSettings
    coordinator_id: str
    model_name: str
    shard_type: str
    redis_url: str | None = None  # None: an embedded valkey-server and one local worker per shard
    db_path: str | None = None  # a history writer consumes the events into this DuckDB file
    max_browsers: int = 0  # local workers (one browser each) at most; consecutive shards share one (0: no cap)
    serve_shard_files: bool = True  # announce this coordinator as a by-hash holder of its shards (enable_ipfs)


@dataclass(frozen=True, slots=True)
class Runtime:
    """The started parts a client works with."""

    broker: Broker
    ledger: Ledger
    tracker: RequestTracker  # futures of accepted work, resolved by a result or a dead letter
    recoverer: Recoverer
    dispatcher: Dispatcher
    plan_id: str
    route: tuple[str, ...]


class Deployment:
    """One plan on a broker and its workers; ``start`` once, ``close`` (idempotent) to undo all of it."""

    def __init__(
        self,
        config: DeploymentConfig,
        *,
        fleet: Fleet,
        policy: Policy,
        metrics: LiveMetrics,
        progress: Progress,
        on_history_commit: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.policy = policy
        self.metrics = metrics
        self._progress = progress
        self._on_history_commit = on_history_commit
        self._stack = contextlib.AsyncExitStack()
        self._started = False
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._draining = False  # once close waits for the background tasks, no more are started
        self.broker: Broker | None = None
        self.embedded: EmbeddedValkey | None = None
        self.local: LocalWorkers | None = None
        self.placement: Placement | None = None
        self.route: tuple[str, ...] = ()
        self._runtime: Runtime | None = None

    async def live_workers(self) -> list[WorkerInfo]:
        """Workers whose heartbeat is fresh (``heartbeat_max_age_ms``) on this deployment's broker."""
        if self.broker is None:
            raise XshardError("the deployment is not started")
        return await self.broker.live_workers(int(now_ms()), self.config.settings.heartbeat_max_age_ms)

    @property
    def url(self) -> str | None:
        """The broker in use, while connected."""
        return self.broker.url if self.broker else None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise XshardError("the deployment is not started")
        return self._runtime

    @property
    def runtime_or_none(self) -> Runtime | None:
        return self._runtime

    # -- starting --------------------------------------------------------------------------------

    async def start(self, shards: ShardSet, slots: Mapping[int, Slot]) -> None:
        """Connect, start the readers, start or find one worker per shard, load the shards, watch liveness.

        Raises AllocationError, BrokerError, XshardError or OSError; ``close`` undoes what had started."""
        if self._started:
            raise XshardError("a deployment starts once; make a new one")
        self._started = True
        broker = await self._connect()
        await self._serve_shard_files(broker, shards)
        rt = self._wire(broker, shards)
        await self._start_readers(rt)
        groups = shards.plan.shard_groups
        match = await (
            self._launch_local(broker, slots, groups) if self.config.redis_url is None else self._find(slots, groups)
        )
        target = Target(self.config.model_name, self.config.shard_type, shards, rt.route)
        self.placement = Placement(target, match.slots, rt.dispatcher, self.fleet)
        self._progress(f"loading {sum(map(len, match.workers.values()))} shard sessions in the browsers")
        self.fleet.update(await self.live_workers())  # their page budgets, before placing
        await self.placement.load(match.workers, self.config.settings.assign_timeout_s)
        self.fleet.update(await self.live_workers())
        self._start_monitor(rt)

    async def _connect(self) -> Broker:
        s, stack = self.config.settings, self._stack
        url = self.config.redis_url
        if url is None:
            self._progress("starting the embedded valkey broker")
            self.embedded = await stack.enter_async_context(EmbeddedValkey())
            url = self.embedded.url
        self.broker = broker = Broker(url, s.namespace, ca_file=s.redis_ca_file or None)
        stack.push_async_callback(broker.close)
        stack.push_async_callback(self._forget_reply_stream, broker)
        await broker.ping()
        if self.config.redis_url is None:
            self.local = LocalWorkers(
                broker.url,
                s.namespace,
                s.cache_dir,
                s.heartbeat_s,
                allow_fault_injection=s.allow_fault_injection,
                warm_spare=s.warm_spare,
            )
            stack.push_async_callback(self.local.stop_all)
        else:
            stack.push_async_callback(self._release_stages, broker)
        return broker

    async def _serve_shard_files(self, broker: Broker, shards: ShardSet) -> None:
        """Workers of other hosts fetch shard files by hash from any holder; this coordinator is the first
        (local workers read them from the cache they share with it); not with ``enable_ipfs=False``."""
        if self.config.redis_url is not None and self.config.serve_shard_files:
            where = serving_address(broker.url, self.config.settings.artifact_url)
            await self._stack.enter_async_context(Holding(broker, self.config.coordinator_id, shards.shard_dir, where))

    def _wire(self, broker: Broker, shards: ShardSet) -> Runtime:
        c = self.config
        plan = shards.plan
        self.route = tuple(broker.keys.stage(plan.plan_id, st.index) for st in plan.stages)
        ledger = Ledger(broker)
        tracker = RequestTracker(ledger, c.coordinator_id)
        recoverer = Recoverer(
            broker=broker,
            ledger=ledger,
            fleet=self.fleet,
            policy=self.policy,
            tracker=tracker,
            metrics=self.metrics,
            assign=self.assign_stage,
            coordinator_id=c.coordinator_id,
            model_name=c.model_name,
            plan_id=plan.plan_id,
        )
        dispatcher = Dispatcher(broker, c.coordinator_id, self._on_result, recoverer.on_failure)
        self._runtime = Runtime(broker, ledger, tracker, recoverer, dispatcher, plan.plan_id, self.route)
        return self._runtime

    async def _start_readers(self, rt: Runtime) -> None:
        stack = self._stack
        stack.push_async_callback(self._bounded, "the reply reader", rt.dispatcher.close)
        await rt.dispatcher.start()
        if self.config.db_path:
            writer = HistoryWriter(rt.broker, self.config.db_path, on_commit=self._history_committed)
            stack.push_async_callback(self._close_history_writer, writer)
            await writer.start()
        stack.callback(rt.tracker.cancel_all)
        stack.push_async_callback(self._bounded, "recovery event appends", rt.recoverer.drain)
        stack.push_async_callback(self._bounded, "pending event appends", self._drain_background)

    async def _launch_local(self, broker: Broker, slots: Mapping[int, Slot], shards: Sequence[Sequence[int]]) -> Match:
        """One local worker per run of consecutive shards (``hosting.host_groups``: one per shard unless
        ``max_browsers`` caps them), each page with its share of the cores (``hosting.wasm_threads``)."""
        assert self.local is not None
        s = self.config.settings
        groups, hosted = host_groups(slots, self.config.max_browsers or len(shards), shards)
        for g in groups:
            if find_executable(g.browser) is None:
                raise AllocationError(install_hint(g.browser))
        threads = wasm_threads(os.cpu_count() or 1, len(groups), s.wasm_threads)
        chosen = {g: self.local.spawn(g.browser, g.platform, threads).worker_id for g in groups}
        names = ", ".join(g.browser for g in groups)
        self._progress(f"launching {len(chosen)} headless browsers ({names}), {threads} wasm thread(s) each")
        ids = list(chosen.values())
        await self.local.wait_registered(broker, ids, s.worker_wait_s, s.heartbeat_max_age_ms, stop=self._stop)
        return Match({i: [wid] for g, wid in chosen.items() for i in g.shards}, hosted)

    async def _find(self, slots: Mapping[int, Slot], shards: Sequence[Sequence[int]]) -> Match:
        """Map shards to registered workers: a matching browser first; extra workers scale out.

        Waits until every shard has a free worker of its browser, or (once there are enough workers
        of any browser) ``browser_match_wait_s`` more, then takes other browsers and says so.
        """
        assert self.broker is not None
        s, n = self.config.settings, len(shards)
        deadline = time.monotonic() + s.worker_wait_s
        enough_since: float | None = None
        self._progress(f"waiting for {n} workers on {redact(self.config.redis_url)}")
        async for _ in poll(WORKER_POLL_S, self._stop):
            live = await self.live_workers()
            if len(live) >= n:
                enough_since = enough_since or time.monotonic()
                substitute = time.monotonic() - enough_since > s.browser_match_wait_s
                match = match_browsers(slots, live, substitute=substitute, shards=shards)
                if match is not None:
                    return match
            if time.monotonic() > deadline:
                have = ", ".join(f"{w.worker_id} ({w.browser})" for w in live) or "none"
                raise AllocationError(
                    f"{n} shards need {n} workers; {len(live)} registered on "
                    f"{redact(self.config.redis_url)} (namespace {s.namespace}) within {s.worker_wait_s}s: {have}"
                )
        raise AllocationError("the deployment was closed while waiting for workers")

    def _start_monitor(self, rt: Runtime) -> None:
        s = self.config.settings
        monitor = Monitor(
            rt.broker,
            self.fleet,
            rt.recoverer,
            rt.route,
            self.assign_stage,
            s.monitor_interval_s,
            s.sweep_interval_s,
            s.min_idle_ms,
            liveness=Liveness(rt.broker, self.local.exited if self.local else None),
        )
        task = asyncio.get_running_loop().create_task(monitor.run_until_stopped())
        self._stack.push_async_callback(self._stop_monitor, monitor, task)

    # -- running ---------------------------------------------------------------------------------

    async def assign_stage(self, index: int, worker_id: str) -> bool:
        """Redistribute: load stage ``index``'s shard onto ``worker_id`` (recovery and the monitor call it)."""
        if self.placement is None:
            return False
        return await self.placement.assign_stage(index, worker_id, self.config.settings.assign_reply_timeout_s)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` beside the caller (an event append, say); ``close`` waits for it, bounded."""
        if self._draining:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_result(self, msg: StageResult, entry: Entry) -> None:
        rt = self.runtime
        for t in msg.trace:
            self.fleet.record(t.worker_id, t.execution_provider, ok=True)
        await rt.tracker.on_result(msg, entry)
        rt.recoverer.finished(msg.request_id, ok=True)

    def _history_committed(self, *_: object) -> None:
        if self._on_history_commit is not None:
            self.spawn(self._on_history_commit())

    # -- closing ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Undo everything ``start`` did, in reverse; safe to call again, or after a failed start."""
        self._stop.set()
        try:
            await self._stack.aclose()
        finally:
            self.broker = self.embedded = self.local = None

    async def _bounded(self, what: str, step: Callable[[], Awaitable[Any]]) -> None:
        try:
            await asyncio.wait_for(step(), CLOSE_STEP_TIMEOUT_S)
        except TimeoutError:
            log.warning("close: %s did not finish within %ss", what, CLOSE_STEP_TIMEOUT_S)

    async def _stop_monitor(self, monitor: Monitor, task: asyncio.Task[None]) -> None:
        monitor.stop()
        task.cancel()
        await self._bounded("the monitor", lambda: asyncio.gather(task, return_exceptions=True))

    async def _drain_background(self) -> None:
        self._draining = True
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _close_history_writer(self, writer: HistoryWriter) -> None:
        try:
            await writer.close()  # flushes what is in the events stream
        except (BrokerError, HistoryError) as e:
            log.warning("history writer: %s", e)

    async def _release_stages(self, broker: Broker) -> None:
        """External workers keep running: tell each to drop the stages this deployment gave it."""
        for wid, streams in (self.placement.assigned if self.placement else {}).items():
            for stream in streams:
                try:
                    await broker.add(broker.keys.control(wid), Release(stream))
                except BrokerError as e:
                    log.warning("could not release %s on %s: %s", stream, wid, e)

    async def _forget_reply_stream(self, broker: Broker) -> None:
        """Delete this coordinator's reply stream unless requests it accepted are still in flight."""
        rt, cid = self._runtime, self.config.coordinator_id
        with contextlib.suppress(BrokerError):
            if rt is not None and not await rt.ledger.inflight(cid):
                await broker.delete(broker.keys.reply(cid))
