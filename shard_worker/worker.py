"""A shard worker: one process, one browser, any number of assigned shards.

Setup, then three loops: heartbeat (registry), control (assignments from coordinators) and jobs
(XREADGROUP on the served stage streams -> run in the page -> hand off downstream -> ack).
A job is acked only in the same MULTI that publishes its output downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker.errors import BrokerUnavailable
from broker.keys import STAGE_GROUP
from broker.messages import (
    Assignment,
    AssignmentReply,
    ExecutionEvent,
    Message,
    Release,
    ShardFailure,
    ShardJob,
    ShardResult,
    StageTrace,
)
from broker.streams import Broker, Delivery

from .bridge import Bridge
from .browser import BrowserProcess
from .errors import BridgeClosed, BridgeTimeout, BrowserError, PageError, WorkerError
from .server import StaticServer, find_ort_dist
from .settings import WorkerSettings

log = logging.getLogger(__name__)


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage this worker serves: which session, what it feeds and what it forwards."""

    stream: str
    shard_index: int
    input_names: tuple[str, ...]
    carry_names: tuple[str, ...]
    provider: str
    adapter: str
    model_name: str
    shard_type: str


class ShardWorker:
    """Owns the page server, the bridge, the browser and the broker connection."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.id = settings.worker_id
        self.stages: dict[str, Stage] = {}
        self._stages_changed = asyncio.Event()
        self._server: StaticServer | None = None
        self._bridge: Bridge | None = None
        self._browser: BrowserProcess | None = None
        self._broker: Broker | None = None
        self._stop = asyncio.Event()
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

    async def _start(self) -> None:
        s = self.settings
        ort_dir = find_ort_dist()
        if ort_dir is None:
            raise WorkerError("onnxruntime-web is not installed: run `npm ci` in the xshard checkout (make setup)")
        s.shard_dir.mkdir(parents=True, exist_ok=True)
        self._broker = Broker(s.redis_url, s.namespace)
        await self._broker.ping()
        self._server = StaticServer(ort_dir, s.shard_dir).start()
        self._bridge = await Bridge().start()
        url = (
            f"http://127.0.0.1:{self._server.port}/#ws={self._bridge.port}&token={self._bridge.token}"
            f"&platform={s.platform}&threads={s.wasm_threads}"
        )
        self._browser = await BrowserProcess(s.browser, url).launch()
        hello = asyncio.ensure_future(self._bridge.wait_hello(s.launch_timeout_s))
        lost = asyncio.ensure_future(self._browser.lost.wait())
        await asyncio.wait({hello, lost}, return_when=asyncio.FIRST_COMPLETED)
        if not hello.done():
            hello.cancel()
            raise BrowserError(f"{s.browser} died before its page connected: {self._browser.lost_reason}")
        lost.cancel()
        caps = hello.result()
        choice = self._bridge.choice
        if "error" in choice:
            raise WorkerError(f"{s.browser} cannot run platform {s.platform}: {choice['error']}")
        if choice.get("note"):
            log.warning("worker %s: %s", self.id, choice["note"])
        await self._broker.delete(self._broker.keys.control(self.id))
        await self._broker.register_worker(
            self.id,
            {
                "browser": s.browser, "platform": s.platform, "user_agent": caps["userAgent"],
                "execution_provider": choice["provider"], "adapter": choice["adapter"],
                "platform_note": choice.get("note", ""), "capabilities": caps, "pid": str(os.getpid()),
                "browser_pid": str(self._browser.pid), "host": socket.gethostname(), "started_ms": str(int(now_ms())),
                "stages": [],
            },
            int(now_ms()),
        )  # fmt: skip
        log.info(
            "worker %s ready: %s, %s on %s (%s)", self.id, s.browser, choice["provider"], choice["adapter"],
            caps["userAgent"],
        )  # fmt: skip

    async def close(self) -> None:
        if self._broker is not None:
            with contextlib.suppress(BrokerUnavailable):
                await asyncio.wait_for(self._broker.unregister_worker(self.id), 2.0)
        if self._bridge is not None:
            await self._bridge.close()
        if self._browser is not None:
            await self._browser.close()
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            await self._broker.close()

    def stop(self, reason: str = "stop requested") -> None:
        if not self._stop.is_set():
            self.exit_reason = reason
            self._stop.set()

    async def serve(self) -> str:
        """Run until stopped or the browser is lost; returns why it ended."""
        assert self._browser is not None and self._bridge is not None
        tasks = [
            asyncio.ensure_future(self._heartbeat_loop()),
            asyncio.ensure_future(self._control_loop()),
            asyncio.ensure_future(self._job_loop()),
            asyncio.ensure_future(self._watch(self._browser.lost, lambda: self._browser.lost_reason)),  # type: ignore[union-attr]
            asyncio.ensure_future(self._watch(self._bridge.closed, lambda: self._bridge.close_reason)),  # type: ignore[union-attr]
        ]
        stop = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stop and t.exception() is not None:
                self.stop(f"{type(t.exception()).__name__}: {t.exception()}")
        for t in [stop, *tasks]:
            t.cancel()
        await asyncio.gather(stop, *tasks, return_exceptions=True)
        return self.exit_reason

    async def _watch(self, event: asyncio.Event, reason: Any) -> None:
        await event.wait()
        self.stop(reason())

    # -- loops -------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        assert self._broker
        while True:
            await self._broker.heartbeat(self.id, int(now_ms()), sorted(self.stages))
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _control_loop(self) -> None:
        assert self._broker
        stream, last_id = self._broker.keys.control(self.id), "0"
        while True:
            for d in await self._broker.read(stream, last_id, block_ms=1000):
                last_id = d.entry_id
                if isinstance(d.message, Assignment):
                    await self._assign(d.message)
                elif isinstance(d.message, Release):
                    await self._release(d.message.stage_stream)
                else:
                    log.error("worker %s: ignoring control entry %s: %s", self.id, d.entry_id, d.error or d.message)

    async def _assign(self, a: Assignment) -> None:
        assert self._broker and self._bridge
        path = self.settings.shard_dir / f"{a.onnx_sha256}.onnx"
        platform = self.settings.platform if a.platform == "auto" else a.platform
        reply: dict[str, Any] = {
            "ok": False,
            "error": "",
            "execution_provider": "",
            "adapter": "",
            "load_ms": 0.0,
        }
        if not path.is_file():
            reply["error"] = f"shard file {path} is not in this worker's cache"
        else:
            try:
                info = await self._bridge.request(
                    "load", self.settings.load_timeout_s, key=a.stage_stream,
                    url=f"/shards/{a.onnx_sha256}.onnx", platform=platform,
                )  # fmt: skip
                await self._broker.ensure_group(a.stage_stream, STAGE_GROUP)
                self.stages[a.stage_stream] = Stage(
                    a.stage_stream,
                    a.shard_index,
                    a.input_names,
                    a.carry_names,
                    info["provider"],
                    info["adapter"],
                    a.model_name,
                    a.shard_type,
                )
                self._stages_changed.set()
                reply.update(ok=True, execution_provider=info["provider"], adapter=info["adapter"],
                             load_ms=float(info["load_ms"]), note=info.get("note") or "")  # fmt: skip
                log.info("worker %s serves shard %d of %s with %s (%.0f ms to load)", self.id, a.shard_index,
                         a.plan_id, info["provider"], info["load_ms"])  # fmt: skip
            except (PageError, BridgeTimeout) as e:
                reply["error"] = f"loading shard {a.shard_index} failed: {e}"
        await self._broker.add(
            a.reply_stream,
            AssignmentReply(
                assignment_id=a.assignment_id, worker_id=self.id, user_agent=self._bridge.capabilities["userAgent"],
                **reply,
            ),
        )  # fmt: skip

    async def _release(self, stream: str) -> None:
        assert self._bridge
        if self.stages.pop(stream, None) is not None:
            self._stages_changed.set()
            with contextlib.suppress(PageError, BridgeTimeout):
                await self._bridge.request("release", self.settings.load_timeout_s, key=stream)

    async def _job_loop(self) -> None:
        assert self._broker
        while True:
            if not self.stages:
                self._stages_changed.clear()
                await self._stages_changed.wait()
                continue
            deliveries = await self._broker.read_group(
                STAGE_GROUP, self.id, list(self.stages), count=1, block_ms=self.settings.block_ms
            )
            for d in deliveries:
                await self._process(d)

    # -- one job -----------------------------------------------------------------------------

    async def _process(self, d: Delivery) -> None:
        assert self._broker and self._bridge and self._browser
        started = time.perf_counter()
        job = d.message
        stage = self.stages.get(d.stream)
        if not isinstance(job, ShardJob) or stage is None:
            why = d.error or (f"not a job: {job!r}" if stage else f"stage {d.stream} not served here")
            log.error("worker %s: dropping entry %s of %s: %s", self.id, d.entry_id, d.stream, why)
            await asyncio.shield(self._broker.ack(d.stream, STAGE_GROUP, d.entry_id))
            return
        queue_ms = max(0.0, now_ms() - job.enqueued_ms)
        missing = [n for n in stage.input_names if n not in job.tensors]
        if missing:
            await self._fail(d, job, stage, "input", f"job lacks tensors {missing} for shard {stage.shard_index}")
            return
        # shard graphs take scalars as one-element vectors (onnxruntime-web mis-ranks rank-0 feeds)
        feeds = {n: job.tensors[n].reshape(1) if job.tensors[n].ndim == 0 else job.tensors[n]
                 for n in stage.input_names}  # fmt: skip
        try:
            result = await self._bridge.run(d.stream, feeds, self.settings.run_timeout_s)
        except PageError as e:
            shapes = ", ".join(f"{n}: {a.dtype}{list(a.shape)}" for n, a in feeds.items())
            await self._fail(d, job, stage, "kernel", f"{e} (inputs {shapes})")
            return
        except (BridgeClosed, BridgeTimeout) as e:
            log.error(
                "worker %s: request %s shard %d left pending: %s",
                self.id,
                job.request_id,
                stage.shard_index,
                e,
            )
            self.stop(str(e))
            raise
        env = {**job.tensors, **result.outputs}
        out: dict[str, np.ndarray] = {n: env[n] for n in stage.carry_names if n in env}
        lacking = [n for n in stage.carry_names if n not in env]
        if lacking:
            await self._fail(d, job, stage, "kernel", f"shard {stage.shard_index} did not produce {lacking}")
            return
        bytes_in = sum(a.nbytes for a in feeds.values())
        bytes_out = sum(a.nbytes for a in out.values())
        worker_ms = (time.perf_counter() - started) * 1000.0
        trace = self._trace(stage, job, result.kernel_ms, queue_ms, worker_ms, bytes_in, bytes_out, result)
        nxt = job.stage_index + 1
        msg: Message
        if nxt < len(job.route):
            dst = job.route[nxt]
            msg = ShardJob(
                request_id=job.request_id, plan_id=job.plan_id, stage_index=nxt, route=job.route,
                reply_stream=job.reply_stream, tensors=out, enqueued_ms=now_ms(), attempt=job.attempt,
                trace=(*job.trace, trace),
            )  # fmt: skip
        else:
            dst = job.reply_stream
            msg = ShardResult(job.request_id, job.plan_id, out, (*job.trace, trace), job.attempt)
        event = self._event(stage, job, "success", result.kernel_ms, queue_ms, worker_ms - result.kernel_ms,
                            bytes_in, bytes_out)  # fmt: skip
        await asyncio.shield(self._broker.hand_off(d.stream, STAGE_GROUP, d.entry_id, dst, msg, event))

    def _event(
        self, stage: Stage, job: ShardJob, outcome: str, kernel_ms: float, queue_ms: float, transfer_ms: float,
        bytes_in: int, bytes_out: int, error: str = "",
    ) -> ExecutionEvent:  # fmt: skip
        return ExecutionEvent(
            event_id=uuid.uuid4().hex, ts_ms=now_ms(), request_id=job.request_id, plan_id=job.plan_id,
            model_name=stage.model_name, shard_index=stage.shard_index, shard_type=stage.shard_type,
            worker_id=self.id, browser=self.settings.browser, platform=stage.provider, adapter=stage.adapter,
            kernel_ms=kernel_ms, queue_ms=queue_ms, transfer_ms=transfer_ms, bytes_in=bytes_in,
            bytes_out=bytes_out, attempt=job.attempt, outcome=outcome, error=error,
        )  # fmt: skip

    def _trace(
        self, stage: Stage, job: ShardJob, kernel_ms: float, queue_ms: float, worker_ms: float,
        bytes_in: int, bytes_out: int, result: Any,
    ) -> dict[str, Any]:  # fmt: skip
        assert self._bridge
        t = StageTrace(
            shard_index=stage.shard_index, worker_id=self.id, browser=self.settings.browser,
            user_agent=self._bridge.capabilities["userAgent"], execution_provider=result.provider,
            adapter=result.adapter, kernel_ms=kernel_ms, queue_ms=queue_ms, worker_ms=worker_ms,
            bytes_in=bytes_in, bytes_out=bytes_out, attempt=job.attempt,
        )  # fmt: skip
        return {f: getattr(t, f) for f in t.__slots__}  # type: ignore[attr-defined]

    async def _fail(self, d: Delivery, job: ShardJob, stage: Stage, kind: str, error: str) -> None:
        assert self._broker
        log.warning("worker %s: request %s shard %d failed (%s): %s", self.id, job.request_id, stage.shard_index,
                    kind, error)  # fmt: skip
        failure = ShardFailure(
            request_id=job.request_id, plan_id=job.plan_id, stage_index=job.stage_index, worker_id=self.id,
            attempt=job.attempt, kind=kind, error=error, trace=job.trace,
        )  # fmt: skip
        event = self._event(stage, job, "error", 0.0, max(0.0, now_ms() - job.enqueued_ms), 0.0, 0, 0, error)
        await asyncio.shield(
            self._broker.hand_off(d.stream, STAGE_GROUP, d.entry_id, job.reply_stream, failure, event)
        )
