"""A shard worker: one process, one browser, any number of assigned shards.

Setup, then four loops: heartbeat (registry), control (assignments and commands), jobs (XREADGROUP
on the served stage streams and this worker's direct stream -> run in the page -> hand off
downstream) and the page watchdog (a lost browser is restarted and its shards reloaded at once).

A job is acked only by the ``hand_off`` script that publishes its output, and only while this
worker still owns it: a job reclaimed by recovery while this worker hung is not published twice.
A job that cannot run here is handed back to its coordinator as a ``ShardFailure`` carrying its
inputs; the coordinator's recovery policy decides what happens next. Broker outages are ridden out
with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from broker.errors import BrokerUnavailable
from broker.keys import STAGE_GROUP
from broker.messages import (
    Assignment,
    AssignmentReply,
    ExecutionEvent,
    Inject,
    Message,
    Release,
    Restart,
    ShardFailure,
    ShardJob,
    ShardResult,
    StageTrace,
)
from broker.registry import WorkerInfo, WorkerState, transition
from broker.streams import Broker, Delivery

from .bridge import RunResult
from .errors import BridgeClosed, BridgeTimeout, PageError, WorkerError
from .page import Page
from .server import StaticServer, find_ort_dist
from .settings import WorkerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
BACKOFF_MAX_S = 2.0


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage this worker serves: its shard file, what it feeds and forwards, where it runs."""

    stream: str
    shard_index: int
    onnx_sha256: str
    input_names: tuple[str, ...]
    carry_names: tuple[str, ...]
    platform: str  # as assigned: auto, wasm, webgpu or webnn
    model_name: str
    shard_type: str
    provider: str = ""  # what the page picked for ``platform``

    def session_key(self, platform: str) -> str:
        return f"{self.stream}|{platform}"


class ShardWorker:
    """Owns the page server, the page (browser + bridge) and the broker connection."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.id = settings.worker_id
        self.stages: dict[str, Stage] = {}
        self.state = WorkerState.STARTING
        self._started_ms = int(now_ms())
        self._stages_changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._server: StaticServer | None = None
        self._page: Page | None = None
        self._broker: Broker | None = None
        self._stop = asyncio.Event()
        self._restart_lock = asyncio.Lock()
        self._restarts: list[float] = []
        self._read_pending = True
        self._inject_kernel_errors = 0
        self._page_started_ms = 0.0
        self.exit_reason = ""

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
    def page(self) -> Page:
        if self._page is None:
            raise WorkerError("page not launched")
        return self._page

    async def _start(self) -> None:
        s = self.settings
        ort_dir = find_ort_dist()
        if ort_dir is None:
            raise WorkerError("onnxruntime-web is not installed: run `npm ci` in the xshard checkout (make setup)")
        s.shard_dir.mkdir(parents=True, exist_ok=True)
        self._broker = Broker(s.redis_url, s.namespace)
        await self._broker.ping()
        self._server = StaticServer(ort_dir, s.shard_dir).start()
        self._page = await Page(s, self._server).launch()
        self._page_started_ms = now_ms()
        choice = self._page.choice
        if choice.get("note"):
            log.warning("worker %s: %s", self.id, choice["note"])
        await self.broker.delete(self.broker.keys.control(self.id))
        self.state = transition(self.state, WorkerState.READY)
        await self.broker.register_worker(self._registration(), int(now_ms()))
        self._ready.set()
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
        )

    async def close(self) -> None:
        if self._broker is not None:
            with contextlib.suppress(BrokerUnavailable, TimeoutError):
                await asyncio.wait_for(self._broker.unregister_worker(self.id), 2.0)
        if self._page is not None:
            await self._page.close()
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            await self._broker.close()

    def stop(self, reason: str = "stop requested") -> None:
        if not self._stop.is_set():
            self.exit_reason = reason
            self._stop.set()

    async def serve(self) -> str:
        """Run until stopped (or the browser cannot be restarted); returns why it ended."""
        tasks = [
            asyncio.ensure_future(self._resilient("heartbeat", self._heartbeat_loop)),
            asyncio.ensure_future(self._resilient("control", self._control_loop)),
            asyncio.ensure_future(self._resilient("jobs", self._job_loop)),
            asyncio.ensure_future(self._page_watchdog()),
        ]
        stop = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stop and not t.cancelled() and t.exception() is not None:
                self.stop(f"{type(t.exception()).__name__}: {t.exception()}")
        for t in [stop, *tasks]:
            t.cancel()
        await asyncio.gather(stop, *tasks, return_exceptions=True)
        return self.exit_reason

    async def _resilient(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop``; when the broker is unreachable, back off and run it again (reconnect)."""
        delay_s = 0.05
        while not self._stop.is_set():  # redis-py may turn a cancellation into a connection error
            try:
                await loop()
                return
            except BrokerUnavailable as e:
                log.warning("worker %s: %s loop: %s; retrying in %.2fs", self.id, name, e, delay_s)
                self._read_pending = True
                await asyncio.sleep(delay_s)
                delay_s = min(BACKOFF_MAX_S, delay_s * 2)

    async def _until_done(self, what: str, op: Callable[[], Awaitable[T]], deadline_s: float = 120.0) -> T:
        """Retry one broker operation through an outage, with backoff, for at most ``deadline_s``."""
        delay_s, deadline = 0.05, time.monotonic() + deadline_s
        while True:
            try:
                return await op()
            except BrokerUnavailable as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("worker %s: %s: %s; retrying in %.2fs", self.id, what, e, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(BACKOFF_MAX_S, delay_s * 2)

    # -- the page ----------------------------------------------------------------------------

    async def _page_watchdog(self) -> None:
        while True:
            await self.page.lost.wait()
            await self.restart_page(f"browser lost: {self.page.lost_reason}")

    async def restart_page(self, reason: str) -> None:
        """Restart the browser and reload every shard this worker serves."""
        async with self._restart_lock:
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(self._restarts) > MAX_RESTARTS:
                self.stop(f"browser restarted {MAX_RESTARTS} times in {RESTART_WINDOW_S}s; last: {reason}")
                return
            self.state = transition(self.state, WorkerState.RESTARTING)
            self._ready.clear()
            started = time.perf_counter()
            log.warning("worker %s: restarting %s (%s)", self.id, self.settings.browser, reason)
            old, self._page = self._page, None
            if old is not None:
                await old.close()
            assert self._server is not None
            self._page_started_ms = now_ms()
            self._page = await Page(self.settings, self._server).launch()
            for stage in list(self.stages.values()):
                await self.page.load(stage.session_key(stage.platform), stage.onnx_sha256, stage.platform)
            self.state = transition(self.state, WorkerState.READY)
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

    @staticmethod
    def _provider(stage: Stage, platform: str) -> str:
        return stage.provider if platform == stage.platform else platform

    async def _session(self, stage: Stage, platform: str) -> str:
        key = stage.session_key(platform)
        if key not in self.page.loaded:
            await self.page.load(key, stage.onnx_sha256, platform)
        return key

    # -- loops -------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.broker.heartbeat(self.id, int(now_ms()), self.stages, self.state)
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _control_loop(self) -> None:
        stream, last_id = self.broker.keys.control(self.id), "0"
        while True:
            for d in await self.broker.read(stream, last_id, block_ms=1000):
                last_id = d.entry_id
                msg = d.message
                if isinstance(msg, Assignment):
                    await self._assign(msg)
                elif isinstance(msg, Release):
                    await self._release(msg.stage_stream)
                elif isinstance(msg, Restart):
                    if self._page_started_ms < msg.since_ms and not self._restart_lock.locked():
                        asyncio.ensure_future(self.restart_page(f"asked to: {msg.reason}"))
                    else:
                        log.info("worker %s: browser already restarted since the failure; %s", self.id, msg.reason)
                elif isinstance(msg, Inject) and msg.kind == "kernel-error":
                    self._inject_kernel_errors = msg.count
                    log.warning("worker %s: the next %d kernel(s) will throw (injected)", self.id, msg.count)
                else:
                    log.error("worker %s: ignoring control entry %s: %s", self.id, d.entry_id, d.error or msg)

    async def _assign(self, a: Assignment) -> None:
        path = self.settings.shard_dir / f"{a.onnx_sha256}.onnx"
        platform = self.settings.platform if a.platform == "auto" else a.platform
        stage = Stage(
            a.stage_stream,
            a.shard_index,
            a.onnx_sha256,
            a.input_names,
            a.carry_names,
            platform,
            a.model_name,
            a.shard_type,
        )
        reply: dict[str, Any] = {"ok": False, "error": "", "execution_provider": "", "adapter": "", "load_ms": 0.0}
        if not path.is_file():
            reply["error"] = f"shard file {path} is not in this worker's cache"
        else:
            try:
                await self._ready.wait()
                info = await self.page.load(stage.session_key(platform), a.onnx_sha256, platform)
                await self.broker.ensure_group(a.stage_stream, STAGE_GROUP)
                await self.broker.ensure_group(self.broker.keys.direct(self.id), STAGE_GROUP)
                self.stages[a.stage_stream] = dataclasses.replace(stage, provider=info["provider"])
                self._stages_changed.set()
                reply.update(
                    ok=True,
                    execution_provider=info["provider"],
                    adapter=info["adapter"],
                    load_ms=float(info["load_ms"]),
                    note=info.get("note") or "",
                )
                log.info(
                    "worker %s serves shard %d of %s with %s (%.0f ms to load)",
                    self.id,
                    a.shard_index,
                    a.plan_id,
                    info["provider"],
                    info["load_ms"],
                )
            except (PageError, BridgeTimeout, BridgeClosed) as e:
                reply["error"] = f"loading shard {a.shard_index} failed: {e}"
        msg = AssignmentReply(
            assignment_id=a.assignment_id, worker_id=self.id, user_agent=self.page.user_agent, **reply
        )
        await self.broker.add(a.reply_stream, msg)

    async def _release(self, stream: str) -> None:
        stage = self.stages.pop(stream, None)
        if stage is not None:
            self._stages_changed.set()
            for key in [k for k in self.page.loaded if k.startswith(f"{stream}|")]:
                with contextlib.suppress(PageError, BridgeTimeout, BridgeClosed):
                    await self.page.release(key)

    async def _job_loop(self) -> None:
        direct = self.broker.keys.direct(self.id)
        await self.broker.ensure_group(direct, STAGE_GROUP)
        while True:
            await self._ready.wait()
            streams = [*self.stages, direct]
            if self._read_pending:
                deliveries = await self.broker.read_own_pending(STAGE_GROUP, self.id, streams)
                self._read_pending = bool(deliveries)
            else:
                deliveries = await self.broker.read_group(
                    STAGE_GROUP, self.id, streams, count=1, block_ms=self.settings.block_ms
                )
            for d in deliveries:
                await self._process(d)

    # -- one job -----------------------------------------------------------------------------

    async def _process(self, d: Delivery) -> None:
        await self._ready.wait()  # a job read just as the browser was lost runs on the restarted one
        started = time.perf_counter()
        job = d.message
        if not isinstance(job, ShardJob):
            log.error("worker %s: dropping entry %s of %s: %s", self.id, d.entry_id, d.stream, d.error or job)
            await asyncio.shield(self._until_done("ack", lambda: self.broker.ack(d.stream, STAGE_GROUP, d.entry_id)))
            return
        stage = self.stages.get(job.route[job.stage_index]) if job.stage_index < len(job.route) else None
        if stage is None:
            await self._fail(d, job, None, "unavailable", f"worker {self.id} does not serve stage {job.stage_index}")
            return
        queue_ms = max(0.0, now_ms() - job.enqueued_ms)
        missing = [n for n in stage.input_names if n not in job.tensors]
        if missing:
            await self._fail(d, job, stage, "input", f"job lacks tensors {missing} for shard {stage.shard_index}")
            return
        # shard graphs take scalars as one-element vectors (onnxruntime-web mis-ranks rank-0 feeds)
        feeds = {
            n: job.tensors[n].reshape(1) if job.tensors[n].ndim == 0 else job.tensors[n] for n in stage.input_names
        }
        platform = job.target_platform or stage.platform
        fail = None
        if self._inject_kernel_errors > 0:
            self._inject_kernel_errors -= 1
            fail = f"request {job.request_id} shard {stage.shard_index}"
        try:
            key = await self._session(stage, platform)
            result = await self.page.run(key, feeds, fail)
        except PageError as e:
            shapes = ", ".join(f"{n}: {a.dtype}{list(a.shape)}" for n, a in feeds.items())
            await self._fail(d, job, stage, "kernel", f"{e} (inputs {shapes})", self._provider(stage, platform))
            return
        except BridgeTimeout as e:
            await self._fail(d, job, stage, "timeout", str(e), self._provider(stage, platform))
            asyncio.ensure_future(self.restart_page(f"kernel timed out: {e}"))
            return
        except (BridgeClosed, WorkerError) as e:
            lost = f"{self.settings.browser} lost mid-job: {e}"
            await self._fail(d, job, stage, "browser-lost", lost, self._provider(stage, platform))
            return
        env = {**job.tensors, **result.outputs}
        lacking = [n for n in stage.carry_names if n not in env]
        if lacking:
            await self._fail(d, job, stage, "kernel", f"shard {stage.shard_index} did not produce {lacking}", platform)
            return
        out: dict[str, np.ndarray] = {n: env[n] for n in stage.carry_names}
        bytes_in = sum(a.nbytes for a in feeds.values())
        bytes_out = sum(a.nbytes for a in out.values())
        worker_ms = (time.perf_counter() - started) * 1000.0
        trace = self._trace(stage, job, result, queue_ms, worker_ms, bytes_in, bytes_out)
        nxt = job.stage_index + 1
        msg: Message
        if nxt < len(job.route):
            dst = job.route[nxt]
            msg = ShardJob(
                request_id=job.request_id,
                plan_id=job.plan_id,
                stage_index=nxt,
                route=job.route,
                reply_stream=job.reply_stream,
                tensors=out,
                enqueued_ms=now_ms(),
                attempt=1,
                trace=(*job.trace, trace),
            )
        else:
            dst = job.reply_stream
            msg = ShardResult(job.request_id, job.plan_id, out, (*job.trace, trace), job.attempt)
        event = self._event(
            stage,
            job,
            "success",
            result.kernel_ms,
            queue_ms,
            worker_ms - result.kernel_ms,
            bytes_in,
            bytes_out,
            result.provider,
            result.adapter,
        )
        await self._hand_off(d, job, dst, msg, event, final=nxt >= len(job.route))

    async def _hand_off(
        self, d: Delivery, job: ShardJob, dst: str, msg: Message, event: ExecutionEvent, final: bool = False
    ) -> None:
        async def op() -> str | None:
            return await self.broker.hand_off(
                d.stream,
                STAGE_GROUP,
                d.entry_id,
                self.id,
                dst,
                msg,
                event=event,
                request_id=job.request_id,
                progress=(f"s{job.stage_index}", f"{self.id}:{job.attempt}"),
                final=final,
            )

        outcome = await asyncio.shield(self._until_done(f"hand off request {job.request_id}", op))
        if outcome is None:
            log.warning(
                "worker %s: request %s stage %d was reclaimed while this worker held it; its late result is dropped",
                self.id,
                job.request_id,
                job.stage_index,
            )

    def _trace(
        self,
        stage: Stage,
        job: ShardJob,
        result: RunResult,
        queue_ms: float,
        worker_ms: float,
        bytes_in: int,
        bytes_out: int,
    ) -> StageTrace:
        return StageTrace(
            shard_index=stage.shard_index,
            worker_id=self.id,
            browser=self.settings.browser,
            user_agent=self.page.user_agent,
            execution_provider=result.provider,
            adapter=result.adapter,
            kernel_ms=result.kernel_ms,
            queue_ms=queue_ms,
            worker_ms=worker_ms,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            attempt=job.attempt,
        )

    def _event(
        self,
        stage: Stage | None,
        job: ShardJob,
        outcome: str,
        kernel_ms: float,
        queue_ms: float,
        transfer_ms: float,
        bytes_in: int,
        bytes_out: int,
        platform: str,
        adapter: str,
        error: str = "",
    ) -> ExecutionEvent:
        return ExecutionEvent(
            event_id=uuid.uuid4().hex,
            ts_ms=now_ms(),
            request_id=job.request_id,
            plan_id=job.plan_id,
            model_name=stage.model_name if stage else "",
            shard_index=job.stage_index,
            shard_type=stage.shard_type if stage else "",
            worker_id=self.id,
            browser=self.settings.browser,
            platform=platform,
            adapter=adapter,
            kernel_ms=kernel_ms,
            queue_ms=queue_ms,
            transfer_ms=transfer_ms,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            attempt=job.attempt,
            outcome=outcome,
            error=error,
        )

    async def _fail(
        self, d: Delivery, job: ShardJob, stage: Stage | None, kind: str, error: str, platform: str = ""
    ) -> None:
        """Hand the job back to its coordinator with why it failed; recovery decides what next."""
        index = stage.shard_index if stage else job.stage_index
        log.warning("worker %s: request %s shard %d failed (%s): %s", self.id, job.request_id, index, kind, error)
        platform = platform or (stage.provider if stage else "")
        failure = ShardFailure(
            request_id=job.request_id,
            plan_id=job.plan_id,
            stage_index=job.stage_index,
            worker_id=self.id,
            attempt=job.attempt,
            kind=kind,
            error=error,
            trace=job.trace,
            tensors=job.tensors,
            route=job.route,
            reply_stream=job.reply_stream,
            platform=platform,
        )
        event = self._event(
            stage, job, "error", 0.0, max(0.0, now_ms() - job.enqueued_ms), 0.0, 0, 0, platform, "", error
        )
        await self._hand_off(d, job, job.reply_stream, failure, event)
