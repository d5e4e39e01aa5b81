"""A shard worker: one process, one browser, any number of assigned shards.

Setup, then four loops that run until the worker's stop flag is set: the heartbeat (registry), the
control stream (``control.ControlReader``: assignments and commands), the jobs (XREADGROUP on the served
stage streams and this worker's direct stream, each delivery run by ``jobs.JobRunner``) and the page
watchdog (a lost browser is restarted and its shards reloaded at once, within ``RestartBudget``).

Broker outages are ridden out by ``broker.retry.retrying``: a loop is rerun with backoff until the stop
flag is set; a one-shot operation (an ack, a hand-off) gives up after its deadline. The worker's state
moves only through ``broker.registry.transition``: STARTING -> READY <-> RESTARTING -> STOPPING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

from broker.browsers import find_ort_dist
from broker.errors import BrokerUnavailable
from broker.keys import STAGE_GROUP
from broker.kinds import FailureKind
from broker.registry import WorkerInfo, WorkerState, transition
from broker.retry import Stopped, poll, retrying
from broker.streams import Broker

from .artifacts import WorkerArtifacts
from .control import ControlReader
from .errors import WorkerError
from .injection import FaultInjection
from .jobs import JobRunner, now_ms
from .memory import page_budget_bytes
from .page import Page
from .server import StaticServer
from .sessions import SessionRunner, is_session_entry
from .settings import WorkerSettings
from .spare import SparePage
from .stage import Stage

log = logging.getLogger(__name__)

UNREGISTER_TIMEOUT_S = 2.0


class ShardWorker:
    """Owns the page server, the page (browser + bridge) and the broker connection."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.id = settings.worker_id
        self.stages: dict[str, Stage] = {}
        self.state = WorkerState.STARTING
        self.faults = FaultInjection(self.id, settings.allow_fault_injection)
        self.exit_reason = ""
        self._started_ms = int(now_ms())
        self._ready = asyncio.Event()
        self._page_replaced = asyncio.Event()
        self._stop = asyncio.Event()
        self._server: StaticServer | None = None
        self._page: Page | None = None
        self._spare: SparePage | None = None
        self._broker: Broker | None = None
        self._artifacts: WorkerArtifacts | None = None  # shard files: served by hash, fetched when missing
        self._restart_lock = asyncio.Lock()
        self._restart_times_s: tuple[float, ...] = ()
        self._restarts: set[asyncio.Task[None]] = set()
        self._read_pending = True
        self._page_started_ms = 0.0
        self._control = ControlReader(self)
        self._jobs = JobRunner(self)
        self._sessions = SessionRunner(self)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> ShardWorker:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise WorkerError("worker not started")
        return self._broker

    @property
    def artifacts(self) -> WorkerArtifacts:
        if self._artifacts is None:
            raise WorkerError("worker not started")
        return self._artifacts

    @property
    def page(self) -> Page:
        if self._page is None:
            raise WorkerError("page not launched")
        return self._page

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def _start(self) -> None:
        s = self.settings
        ort_dir = find_ort_dist()
        if ort_dir is None:
            raise WorkerError("onnxruntime-web is not installed: run `npm ci` in the xshard checkout (make setup)")
        s.shard_dir.mkdir(parents=True, exist_ok=True)
        self._broker = Broker(s.redis_url, s.namespace, worker_id=self.id, ca_file=s.redis_ca_file or None)
        await self._broker.ping()
        self._artifacts = await WorkerArtifacts(self._broker, s).start()
        self._server = StaticServer(ort_dir, s.shard_dir).start()
        self._page = await Page(s, self._server).launch()
        self._page_started_ms = now_ms()
        choice = self._page.choice
        if choice.get("note"):
            log.warning("worker %s: %s", self.id, choice["note"])
        if s.allow_fault_injection:
            log.warning("worker %s: fault injection is enabled (tests only; never in production)", self.id)
        await self.broker.delete(self.broker.keys.control(self.id))
        self._move(WorkerState.READY)
        await self.broker.register_worker(self._registration(), int(now_ms()))
        self._ready.set()
        self._spare = SparePage(s, self._server)
        self._spare.refill()
        log.info(
            "worker %s ready: %s, %s on %s (%s)",
            self.id,
            s.browser,
            choice["provider"],
            choice["adapter"],
            self.page.user_agent,
        )

    def _registration(self) -> WorkerInfo:
        s, page = self.settings, self.page
        return WorkerInfo(
            worker_id=self.id,
            browser=s.browser,
            platform=s.platform,
            execution_provider=page.choice["provider"],
            adapter=page.choice["adapter"],
            user_agent=page.user_agent,
            host=socket.gethostname(),
            pid=os.getpid(),
            browser_pid=page.browser_pid or 0,
            started_ms=self._started_ms,
            state=self.state,
            stages=tuple(sorted(self.stages)),
            capabilities=page.capabilities,
            platform_note=page.choice.get("note", ""),
            page_budget_bytes=page_budget_bytes(page.capabilities, s.page_budget_bytes),
        )

    def _move(self, target: WorkerState) -> bool:
        """Move to ``target`` (``transition`` refuses illegal moves); a stopping worker stays stopping."""
        if self.state is WorkerState.STOPPING:
            return False
        self.state = transition(self.state, target)
        return True

    async def close(self) -> None:
        for task in list(self._restarts):
            task.cancel()
        if self._broker is not None:
            with contextlib.suppress(BrokerUnavailable, TimeoutError):
                await asyncio.wait_for(self._broker.unregister_worker(self.id), UNREGISTER_TIMEOUT_S)
        if self._spare is not None:
            await self._spare.close()
        if self._page is not None:
            await self._page.close()
        if self._server is not None:
            self._server.close()
        if self._artifacts is not None:
            await self._artifacts.close()
        if self._broker is not None:
            await self._broker.close()

    def stop(self, reason: str = "stop requested") -> None:
        if not self._stop.is_set():
            self.exit_reason = reason
            self._move(WorkerState.STOPPING)
            self._stop.set()

    async def serve(self) -> str:
        """Run until stopped (or the browser cannot be restarted); returns why it ended."""
        tasks = [
            asyncio.ensure_future(self._rerun_until_stopped("heartbeat", self._heartbeat_until_stopped)),
            asyncio.ensure_future(self._rerun_until_stopped("control", self._control_until_stopped)),
            asyncio.ensure_future(self._rerun_until_stopped("jobs", self._jobs_until_stopped)),
            asyncio.ensure_future(self._watch_page_until_stopped()),
        ]
        stop = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stop and not t.cancelled() and t.exception() is not None:
                self.stop(f"{type(t.exception()).__name__}: {t.exception()}")
        self.stop()
        for t in [stop, *tasks]:
            t.cancel()
        await asyncio.gather(stop, *tasks, return_exceptions=True)
        return self.exit_reason

    async def _rerun_until_stopped(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop``; when the broker is unreachable, back off and run it again, until the stop flag."""

        def reconnected(_: BaseException) -> None:
            self._read_pending = True  # re-read this worker's unacked jobs first

        # redis-py may turn the cancellation at shutdown into a connection error: the stop flag ends it
        with contextlib.suppress(Stopped):
            await retrying(loop, what=f"worker {self.id}: {name} loop", stop=self._stop, on_retry=reconnected)

    # -- the loops ---------------------------------------------------------------------------

    async def _heartbeat_until_stopped(self) -> None:
        async for _ in poll(self.settings.heartbeat_s, self._stop):
            await self.broker.heartbeat(self.id, int(now_ms()), self.stages, self.state)
            if self._spare is not None and self.state is WorkerState.READY:
                self._spare.sync(list(self.stages.values()))

    async def _control_until_stopped(self) -> None:
        await self._control.read_until_stopped(self._stop)

    async def _jobs_until_stopped(self) -> None:
        direct = self.broker.keys.direct(self.id)
        await self.broker.ensure_group(direct, STAGE_GROUP)
        while not self._stop.is_set():
            await self._ready.wait()
            streams = [*self.stages, direct]
            if self._read_pending:
                deliveries = await self.broker.read_own_pending(STAGE_GROUP, self.id, streams)
                self._read_pending = bool(deliveries)
            else:
                deliveries = await self.broker.read_group(
                    STAGE_GROUP, self.id, streams, count=1, block_ms=self.settings.block_ms
                )
            read_ms = now_ms()
            for d in deliveries:
                if is_session_entry(d):
                    await self._sessions.process(d, read_ms)
                else:
                    await self._jobs.process(d, read_ms)

    async def _watch_page_until_stopped(self) -> None:
        """Restart a lost browser; wakes up too when the page was replaced (a restart asked for elsewhere)."""
        while not self._stop.is_set():
            await self._ready.wait()
            page = self.page
            self._page_replaced.clear()
            waits = [asyncio.ensure_future(page.lost.wait()), asyncio.ensure_future(self._page_replaced.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if page.lost.is_set() and page is self._page:
                await self.restart_page(f"browser lost: {page.lost_reason}")

    # -- the page ----------------------------------------------------------------------------

    def lost_cause(self) -> tuple[FailureKind, str]:
        """Why the page of a failed run is gone (``Page.lost_cause``): out of memory, or a lost browser."""
        return self.page.lost_cause()

    def restart_soon(self, reason: str) -> None:
        """Restart the browser in the background (the caller goes on)."""
        task = asyncio.ensure_future(self.restart_page(reason))
        self._restarts.add(task)
        task.add_done_callback(self._restarted)

    def _restarted(self, task: asyncio.Task[None]) -> None:
        self._restarts.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            self.stop(f"browser restart failed: {type(e).__name__}: {e}")

    def restart_unless_since(self, since_ms: float, reason: str) -> bool:
        """Restart the browser unless it was (re)started after ``since_ms`` or is restarting now."""
        if self._page_started_ms >= since_ms or self._restart_lock.locked():
            return False
        self.restart_soon(reason)
        return True

    async def restart_page(self, reason: str) -> None:
        """Restart the browser and reload every shard this worker serves, within the restart budget."""
        async with self._restart_lock:
            verdict = self.settings.restart_budget.decide(self._restart_times_s, time.monotonic())
            self._restart_times_s = verdict.kept_times_s
            if not verdict.allowed:
                self.stop(f"{verdict.reason}; last: {reason}")
                return
            if not self._move(WorkerState.RESTARTING):
                return
            self._ready.clear()
            started = time.perf_counter()
            log.warning("worker %s: restarting %s (%s)", self.id, self.settings.browser, reason)
            await self._relaunch()
            if not self._move(WorkerState.READY):
                return
            self._ready.set()
            self._read_pending = True
            with contextlib.suppress(BrokerUnavailable):
                await self.broker.register_worker(self._registration(), int(now_ms()))
            log.warning(
                "worker %s: browser restarted and %d shard(s) reloaded in %.0f ms",
                self.id,
                len(self.stages),
                (time.perf_counter() - started) * 1000,
            )

    async def _relaunch(self) -> None:
        """A new page (the warm spare when there is one) while the old one is closed, then every shard."""
        old, self._page = self._page, None
        if self._server is None:
            raise WorkerError("page server not started")
        started = time.perf_counter()
        closing = asyncio.ensure_future(old.close()) if old is not None else None
        try:
            self._page_started_ms = now_ms()
            spare = await self._spare.take() if self._spare is not None else None
            self._page = spare or await Page(self.settings, self._server).launch()
            up = time.perf_counter()
        finally:
            if closing is not None:
                await closing
        closed = time.perf_counter()
        self._page_replaced.set()
        for stage in list(self.stages.values()):
            if stage.session_key(stage.platform) not in self.page.loaded:  # the spare holds them already
                await self.page.load(stage.session_key(stage.platform), stage, stage.platform)
        log.info(
            "worker %s: %s up in %.0f ms, the old one closed in %.0f ms, shards loaded in %.0f ms",
            self.id,
            "the warm spare" if spare else "a new browser",
            (up - started) * 1000,
            (closed - started) * 1000,
            (time.perf_counter() - closed) * 1000,
        )
        if self._spare is not None:
            self._spare.refill()
